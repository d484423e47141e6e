"""Run folders of ``pass-pretrain`` and ``finetune``: which model file a folder holds, and a readable summary.

A ``pass-pretrain`` run folder holds ``checkpoint.pth`` (resume state), ``config.json``, ``metrics.csv`` and,
once training finished, ``teacher_backbone.pth`` (the export). A ``finetune`` run folder holds ``checkpoint.pth``,
``last.pth`` (the model), ``metrics.csv``, ``summary.json`` and, with ``--plot``, ``metrics.png``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional

from partreid.common.fileio import PathLike

#: files that mark a folder as a run folder
RUN_MARKERS = ("checkpoint.pth", "last.pth", "teacher_backbone.pth", "summary.json", "config.json")
#: model files of a run folder, in order of preference (the export first)
MODEL_FILES = ("teacher_backbone.pth", "last.pth", "checkpoint.pth")


def is_run_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding a pass-pretrain or finetune run (one of :data:`RUN_MARKERS`)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in RUN_MARKERS)


def run_model_file(path: PathLike) -> Optional[Path]:
    """The model file a run folder offers to ``extract-features``/``evaluate`` (:data:`MODEL_FILES` order)."""
    for name in MODEL_FILES:
        candidate = Path(path) / name
        if candidate.is_file():
            return candidate
    return None


def _csv_rows(path: Path) -> List[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def describe_run(path: PathLike) -> str:
    """Summary of a run folder: kind, files (with sizes), progress from ``metrics.csv``, ``summary.json``.

    Reads only; nothing is created in the folder.
    """
    path = Path(path)
    kind = "finetune" if (path / "last.pth").exists() or (path / "summary.json").exists() else "pass-pretrain"
    lines = [f"run folder: {path}", f"  kind: {kind}", "  files:"]
    for child in sorted(path.iterdir()):
        if child.is_file() and not child.name.startswith("."):
            lines.append(f"    {child.name}  {child.stat().st_size / 1e6:.2f} MB")
        elif child.is_dir():
            lines.append(f"    {child.name}/")
    rows = _csv_rows(path / "metrics.csv")
    if rows:
        last = rows[-1]
        progress = ", ".join(f"{k} {v}" for k, v in last.items() if v not in (None, ""))
        lines.append(f"  metrics.csv: {len(rows)} rows; last: {progress}")
    config = path / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
            keys = ("arch", "epochs", "batch_size", "lr", "image_size", "out_dim")
            lines.append("  config: " + ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg))
        except (OSError, ValueError):
            lines.append("  config.json: unreadable")
    summary = path / "summary.json"
    if summary.is_file():
        try:
            lines.append("  summary: " + json.dumps(json.loads(summary.read_text()), default=str))
        except (OSError, ValueError):
            lines.append("  summary.json: unreadable")
    model = run_model_file(path)
    lines.append(f"  model for extract-features: {model.name if model else 'none yet'}")
    return "\n".join(lines)
