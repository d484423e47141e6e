"""The pictures the commands draw (CLI-only code): ranked lists (``evaluate --show-ranks``), cluster grids
(``cluster --plot-clusters``), cross-agreement histograms (``refine-labels --plot``) and training curves
(``finetune --plot``).

Ranked-list pictures: a query followed by its top-k gallery images, framed green (right) or red (wrong).
Used by ``evaluate --show-ranks N --out-dir DIR``. The ranking comes from
:func:`partreid.common.retrieval.evaluation.topk_per_query`; junk entries (same pid AND same camid as the query, Market protocol,
open-reid ``evaluation_metrics/ranking.py`` ``mean_ap``) are skipped here as well, so a top-k computed without labels
can be passed as long as it has enough spare columns.

Layout of one picture (all sizes in pixels; see :func:`ranked_list_layout`): ``1 + topk`` cells of
``tile_size = (width, height)`` in a row, the query first, a wider gap after the query. Each cell is the image
resized to the cell minus a ``border``-pixel frame drawn in the frame colour: :data:`QUERY_COLOR` for the
query, :data:`RIGHT_COLOR` for a gallery image with the query's pid, :data:`WRONG_COLOR` otherwise
(distractors, pid 0, are wrong), :data:`EMPTY_COLOR` (a plain cell) where the list is shorter than ``topk``.
A caption line under each cell gives ``pid/camid`` (and the rank for gallery cells).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from partreid.common.errors import InputError
from partreid.common.fileio import atomic_path

__all__ = ["save_ranked_lists", "ranked_list_layout", "save_cluster_grid", "plot_agreement", "plot_history",
           "RIGHT_COLOR", "WRONG_COLOR", "QUERY_COLOR", "EMPTY_COLOR"]

log = logging.getLogger("partreid")

RIGHT_COLOR = (0, 200, 0)
WRONG_COLOR = (220, 0, 0)
QUERY_COLOR = (40, 90, 230)
EMPTY_COLOR = (200, 200, 200)
BACKGROUND = (255, 255, 255)
MARGIN = 6          # around the row of cells
GAP = 4             # between gallery cells
QUERY_GAP = 16      # between the query and the first gallery cell
CAPTION_H = 14      # caption line under the cells

ImageLike = Union[str, Path, Image.Image, Callable[[], Image.Image]]


def ranked_list_layout(num_cells: int, tile_size: Tuple[int, int] = (64, 128)
                       ) -> Tuple[Tuple[int, int], List[Tuple[int, int, int, int]]]:
    """Canvas size and cell boxes of a ranked-list picture.

    Args:
        num_cells: 1 (query) + number of gallery cells.
        tile_size: (width, height) of one cell in pixels, frame included.

    Returns:
        ``((canvas_width, canvas_height), boxes)`` with ``boxes[i] = (x0, y0, x1, y1)`` (x1, y1 exclusive);
        cell 0 is the query, cell ``i`` ≥ 1 the gallery entry at rank ``i``.
    """
    w, h = int(tile_size[0]), int(tile_size[1])
    boxes = []
    x = MARGIN
    for i in range(num_cells):
        boxes.append((x, MARGIN, x + w, MARGIN + h))
        x += w + (QUERY_GAP if i == 0 else GAP)
    width = boxes[-1][2] + MARGIN
    height = MARGIN + h + CAPTION_H + MARGIN
    return (width, height), boxes


def _default_open(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _load(item: ImageLike, open_image: Callable[[str], Image.Image]) -> Optional[Image.Image]:
    try:
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if callable(item):
            return item().convert("RGB")
        return open_image(str(item)).convert("RGB")
    except OSError as exc:
        log.warning("ranked-list picture: cannot read image %s (%s); drawing an empty cell", item, exc)
        return None


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, box, image: Optional[Image.Image],
               color, border: int, caption: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    inner = (x1 - x0 - 2 * border, y1 - y0 - 2 * border)
    if image is not None and inner[0] > 0 and inner[1] > 0:
        canvas.paste(image.resize(inner, Image.BILINEAR), (x0 + border, y0 + border))
    elif inner[0] > 0 and inner[1] > 0:
        draw.rectangle((x0 + border, y0 + border, x1 - border - 1, y1 - border - 1), fill=EMPTY_COLOR)
    if caption:
        draw.text((x0, y1 + 1), caption, fill=(0, 0, 0))


def save_ranked_lists(query_images: Sequence[ImageLike], gallery_images: Sequence[ImageLike],
                      topk_idx, q_pids, q_camids, g_pids, g_camids, n: int, out_dir,
                      topk: int = 10, *, open_image: Callable[[str], Image.Image] = _default_open,
                      query_indices: Optional[Sequence[int]] = None, tile_size: Tuple[int, int] = (64, 128),
                      border: int = 4) -> List[Path]:
    """Write one PNG per query: the query, then its top-``topk`` gallery images with right/wrong frames.

    Args:
        query_images, gallery_images: per query / gallery entry, a path or key (opened with ``open_image``),
            a PIL image, or a zero-argument callable returning one. Lengths Q and G.
        topk_idx: int (Q, k) gallery indices in ranking order (e.g. from
            :func:`partreid.common.retrieval.evaluation.topk_per_query`); −1 = no entry. Junk entries (same pid AND same camid
            as the query) are skipped, so ``k`` should leave room for them.
        q_pids, q_camids: int (Q,); g_pids, g_camids: int (G,).
        n: number of queries to draw (≥ 1, capped at Q), spread evenly over the query list
            (``round(linspace(0, Q−1, n))``) unless ``query_indices`` is given.
        out_dir: folder for the pictures (created); files are ``query_<index:05d>.png``, written atomically.
        topk: gallery cells per picture (≥ 1).
        open_image: ``key -> PIL.Image`` (e.g. ``ReIDDataset.open_image``, which also reads LMDB keys);
            default opens a file path. An unreadable image (OSError) gives a grey cell and a warning.
        query_indices: explicit queries to draw (overrides ``n``).
        tile_size: (width, height) of a cell in pixels; border: frame width in pixels.

    Returns:
        The written paths, in the order of the queries drawn.

    Raises:
        InputError: inconsistent lengths or shapes, n/topk < 1, a query index out of range.
    """
    topk_idx = np.asarray(topk_idx)
    q_pids, q_camids = np.asarray(q_pids).astype(np.int64), np.asarray(q_camids).astype(np.int64)
    g_pids, g_camids = np.asarray(g_pids).astype(np.int64), np.asarray(g_camids).astype(np.int64)
    num_q, num_g = len(query_images), len(gallery_images)
    if topk_idx.ndim != 2 or topk_idx.shape[0] != num_q:
        raise InputError(f"topk_idx has shape {topk_idx.shape}; expected ({num_q}, k)")
    if len(q_pids) != num_q or len(q_camids) != num_q:
        raise InputError(f"{num_q} query images but {len(q_pids)} pids and {len(q_camids)} camids")
    if len(g_pids) != num_g or len(g_camids) != num_g:
        raise InputError(f"{num_g} gallery images but {len(g_pids)} pids and {len(g_camids)} camids")
    if topk_idx.size and (topk_idx.max() >= num_g or topk_idx.min() < -1):
        raise InputError(f"topk_idx holds gallery indices outside [-1, {num_g - 1}]")
    if int(topk) < 1:
        raise InputError(f"topk must be >= 1, got {topk}")
    if border < 0 or tile_size[0] < 1 or tile_size[1] < 1:
        raise InputError(f"bad tile_size {tile_size} or border {border}")
    if query_indices is None:
        if int(n) < 1:
            raise InputError(f"n must be >= 1, got {n}")
        query_indices = np.unique(np.round(np.linspace(0, num_q - 1, min(int(n), num_q))).astype(np.int64))
    query_indices = [int(i) for i in query_indices]
    for i in query_indices:
        if not 0 <= i < num_q:
            raise InputError(f"query index {i} is outside [0, {num_q - 1}]")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topk = int(topk)
    (cw, ch), boxes = ranked_list_layout(1 + topk, tile_size)
    written = []
    for i in query_indices:
        row = [int(j) for j in topk_idx[i] if j >= 0
               and not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])][:topk]
        canvas = Image.new("RGB", (cw, ch), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        _draw_cell(canvas, draw, boxes[0], _load(query_images[i], open_image), QUERY_COLOR, border,
                   f"q {q_pids[i]}/{q_camids[i]}")
        for rank in range(topk):
            box = boxes[1 + rank]
            if rank >= len(row):
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=EMPTY_COLOR)
                continue
            j = row[rank]
            color = RIGHT_COLOR if g_pids[j] == q_pids[i] else WRONG_COLOR
            _draw_cell(canvas, draw, box, _load(gallery_images[j], open_image), color, border,
                       f"{rank + 1}: {g_pids[j]}/{g_camids[j]}")
        dest = out_dir / f"query_{i:05d}.png"
        with atomic_path(dest) as tmp:
            canvas.save(tmp, format="PNG")
        written.append(dest)
    return written


def save_cluster_grid(images: Sequence[ImageLike], labels, out, *, max_clusters: int = 16, per_row: int = 12,
                      open_image: Callable[[str], Image.Image] = _default_open, tile_size: Tuple[int, int] = (48, 96),
                      seed: int = 0, pids=None) -> Path:
    """Draw one row per discovered identity (pseudo-label), showing up to ``per_row`` of its crops.

    So a person can judge the clusters by eye. The largest clusters come first; each row is captioned with the
    label and its size. When ``pids`` are given, a crop whose pid differs from its cluster's majority pid gets a
    red frame (else green); without pids all frames are grey.

    Args:
        images: per row of the labels file, a path/key (opened with ``open_image``), a PIL image or a callable.
        labels: int (N,) pseudo-labels, -1 = outlier (outliers are not drawn).
        out: PNG to write (atomically).
        max_clusters: rows drawn; per_row: crops per row (sampled with ``seed`` when a cluster is larger).
        tile_size: (width, height) of a crop cell in pixels.
        pids: optional int (N,) true ids.

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: lengths differ, or no cluster to draw.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise InputError(f"cluster grid: {len(images)} images but {len(labels)} labels")
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        raise InputError("cluster grid: every sample is an outlier, nothing to draw")
    ids, sizes = np.unique(clustered, return_counts=True)
    order = ids[np.argsort(-sizes, kind="stable")][:max_clusters]
    rng = np.random.default_rng(seed)
    w, h = tile_size
    caption_w, border, gap = 90, 2, 4
    width = caption_w + per_row * (w + gap) + gap
    height = len(order) * (h + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, lab in enumerate(order):
        members = np.nonzero(labels == lab)[0]
        shown = np.sort(rng.choice(members, size=min(per_row, members.size), replace=False))
        y = gap + r * (h + gap)
        draw.text((gap, y + h // 2 - 12), f"id {int(lab)}", fill=(0, 0, 0))
        draw.text((gap, y + h // 2), f"{members.size} crops", fill=(90, 90, 90))
        majority = None
        if pids is not None:
            vals, counts = np.unique(np.asarray(pids)[members], return_counts=True)
            majority = vals[np.argmax(counts)]
        for c, i in enumerate(shown):
            color = (160, 160, 160) if majority is None else (
                (40, 170, 60) if np.asarray(pids)[i] == majority else (220, 40, 40))
            x = caption_w + gap + c * (w + gap)
            _draw_cell(canvas, draw, (x, y, x + w, y + h), _load(images[i], open_image), color, border, "")
    out = Path(out)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out


def plot_agreement(agreement, out, bins: int = 21) -> Path:
    """Per-part histograms of the cross-agreement scores (PPLR Eq. 1), one panel per part, to a PNG.

    Args:
        agreement: float (N, P) scores in [0, 1] (a labels file's ``agreement``).
        out: PNG to write (atomically). bins: histogram bins over [0, 1].

    Returns:
        ``out`` as a Path.
    """
    a = np.asarray(agreement, np.float32)
    n_parts = max(a.shape[1], 1)
    fig = Figure(figsize=(3.2 * n_parts, 2.8))
    axes = fig.subplots(1, n_parts, squeeze=False, sharey=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for j in range(a.shape[1]):
        ax = axes[0, j]
        ax.hist(a[:, j], bins=edges, color="tab:blue", edgecolor="white")
        ax.set_title(f"part {j}: mean {a[:, j].mean():.3f}" if a.shape[0] else f"part {j}")
        ax.set_xlabel("cross-agreement")
        ax.set_xlim(0, 1)
    axes[0, 0].set_ylabel("samples")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def plot_history(csv_path, out_png) -> Path:
    """Per-epoch curves of a ``finetune`` run's ``metrics.csv``: losses, clusters/outliers, mean cross-agreement
    and test mAP/rank-1 when evaluated, to a PNG (written atomically). Returns ``out_png`` as a Path."""
    df = pd.read_csv(csv_path)
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for col in [c for c in ("loss", "pglr", "triplet", "part", "camera", "memory") if c in df]:
        axes[0].plot(df["epoch"], df[col], marker="o", label=col)
    axes[0].set_title("training losses (epoch mean)")
    axes[0].legend(fontsize=8)
    axes[1].plot(df["epoch"], df["clusters"], marker="o", label="clusters")
    axes[1].plot(df["epoch"], df["outliers"], marker="o", label="outliers")
    axes[1].set_title("pseudo-labels")
    axes[1].legend(fontsize=8)
    axes[2].plot(df["epoch"], df["agreement_mean"], marker="o", label="mean cross-agreement")
    if "mAP" in df and df["mAP"].notna().any():
        sub = df[df["mAP"].notna()]
        axes[2].plot(sub["epoch"], sub["mAP"], marker="s", label="mAP (test)")
        axes[2].plot(sub["epoch"], sub["rank1"], marker="^", label="rank-1 (test)")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("agreement / retrieval")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return out_png
