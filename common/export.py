"""Deployable models: any checkpoint the loader accepts → ONNX or TorchScript, verified against torch.

The exported graph computes the retrieval features exactly as ``extract-features`` does (the same
:func:`partreid.common.extract.compute_batch` rules, without flip): the backbone (or the fine-tuned model with
its BNNecks, ``neck`` after/before), the global fusion (``cls``/``cat``/``mean``), and the L2 normalisation
when ``normalize`` is on. Outputs, in this order and by these names:

- ``global``: float32 (N, D), the retrieval feature;
- ``parts``: float32 (N, P, Dp), one row per part.

Inputs:

- default: ``images``, float32 (N, 3, H, W) at the model's H×W, already normalised with its mean/std (the
  papers' test transform: bicubic resize, to [0, 1], ``(x - mean) / std``);
- ``with_preprocessing``: ``images``, uint8 (N, H', W', 3) RGB crops of any size; the graph converts to float,
  resizes to H×W (bilinear with antialiasing: ONNX ``Resize`` has no PIL-style bicubic) and normalises.
  Features then differ slightly from the bicubic-resized pipeline's (about 1e-3 in cosine on real crops).

The batch dimension (and, with preprocessing, H' and W') is dynamic. The ONNX graph is produced by
``torch.onnx.export(..., dynamo=True)`` (opset 18; the legacy TorchScript-based exporter cannot export the
antialiased resize); TorchScript by ``torch.jit.trace``.

Metadata (:func:`export_metadata`): arch, image size, mean/std, fusion, neck, ``normalized``, input layout,
package version, the source checkpoint's SHA-256 and, optionally, a ``calibrate`` threshold. In ONNX it is
the JSON record under the ``metadata_props`` key ``partreid`` (plus one flat key per scalar field, for viewers
such as Netron); in TorchScript the extra file ``partreid.json``.

Verification (:func:`verify_export`): the exported file is run by onnxruntime (or ``torch.jit.load``) and by
torch on the same real crops; the cosine similarity of every output row with its torch counterpart is
computed, and a row's score is its minimum over ``global`` and the parts. The export fails when any row
scores below ``min_cosine`` (default 0.9999).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from partreid.common import __version__
from partreid.common.errors import InputError
from partreid.common.extract import eval_transform, resolve_fusion as extract_fusion
from partreid.common.fileio import atomic_path
from partreid.common.models.loader import LoadedModel, load_model
from partreid.common.models.onnx_backend import METADATA_KEY, import_onnxruntime
from partreid.common.models.reid import FUSIONS, fuse_features

log = logging.getLogger("partreid.export")

FORMATS = ("onnx", "torchscript")
#: Default minimum cosine between the exported model's and torch's features, per row.
DEFAULT_MIN_COSINE = 0.9999
#: Default number of real crops the verification runs on.
DEFAULT_VERIFY_IMAGES = 32
#: ONNX opset of the exported graph.
DEFAULT_OPSET = 18
#: The crops shipped in the repository (cut from OpenCV's vtest.avi, see their PROVENANCE.md).
SAMPLE_CROPS = Path(__file__).resolve().parents[1] / "data" / "sample" / "vtest"
INPUT_NAME = "images"
OUTPUT_NAMES = ("global", "parts")


class FeatureHead(nn.Module):
    """``images`` (N, 3, H, W) normalised float → (``global`` (N, D), ``parts`` (N, P, Dp)) float32, as
    :func:`partreid.common.extract.compute_batch` computes them (without flip).

    Args:
        loaded: a torch model from :func:`partreid.common.models.loader.load_model` (not an ONNX one).
        fusion: ``cls``/``cat``/``mean`` for a backbone (a fine-tuned model uses its own).
        neck: ``after``/``before`` the BNNeck (fine-tuned models only).
        normalize: L2-normalise the global feature and each part row.
    """

    def __init__(self, loaded: LoadedModel, fusion: str, neck: str = "after", normalize: bool = True):
        super().__init__()
        if loaded.kind == "onnx":
            raise InputError("this model is already an ONNX export; export its source checkpoint instead")
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        if neck not in ("after", "before"):
            raise InputError(f"neck must be 'after' or 'before', got {neck!r}")
        self.model = loaded.model.eval()
        self.reid = loaded.kind == "reid"
        self.fusion, self.neck, self.normalize = fusion, neck, bool(normalize)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.reid:
            g, p = self.model.extract(x, neck=self.neck)
        else:
            g, p = self.model(x)
            g = fuse_features(g, p, self.fusion)
        g, p = g.float(), p.float()
        if self.normalize:
            g = F.normalize(g, dim=1)
            p = F.normalize(p, dim=2)
        return g, p


class WithPreprocessing(nn.Module):
    """uint8 (N, H', W', 3) RGB → float, bilinear antialiased resize to (H, W), ``(x/255 - mean) / std``, then
    ``head``."""

    def __init__(self, head: nn.Module, image_size: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.head = head
        self.size = (int(image_size[0]), int(image_size[1]))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.head((x - self.mean) / self.std)


def resolve_fusion(loaded: LoadedModel, fusion: str) -> str:
    """``auto`` → the fusion ``extract-features --fusion auto`` uses (:func:`partreid.common.extract.resolve_fusion`);
    a fine-tuned model's own fusion, whatever is asked (its BNNeck was trained on it)."""
    if loaded.kind == "reid":
        return str(loaded.meta.get("fusion", "cat"))
    return extract_fusion(loaded, fusion)


def export_metadata(loaded: LoadedModel, checkpoint: str, *, fusion: str, neck: str, normalize: bool,
                    with_preprocessing: bool, fmt: str, dims: Dict[str, List[int]],
                    threshold: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metadata record written into an exported model (see the module docstring)."""
    h, w = loaded.image_size
    meta = {
        "format": "partreid.export", "format_version": 1, "export_format": fmt,
        "arch": loaded.arch, "kind": loaded.kind, "image_size": [int(h), int(w)],
        "pixel_mean": [float(v) for v in loaded.pixel_mean], "pixel_std": [float(v) for v in loaded.pixel_std],
        "fusion": fusion, "neck": neck if loaded.kind == "reid" else "none", "normalized": bool(normalize),
        "with_preprocessing": bool(with_preprocessing),
        "input": (f"{INPUT_NAME}: uint8 (N, H, W, 3) RGB, any H and W (resized to {h}x{w} in the graph)"
                  if with_preprocessing else
                  f"{INPUT_NAME}: float32 (N, 3, {h}, {w}), RGB in [0, 1] normalised with pixel_mean/pixel_std"),
        "outputs": {"global": dims["global"], "parts": dims["parts"]},
        "source_checkpoint": Path(checkpoint).name if not checkpoint.startswith("random:") else checkpoint,
        "source_sha256": loaded.sha256, "source": loaded.source, "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if threshold is not None:
        meta["threshold"] = {k: threshold[k] for k in ("threshold", "metric", "target_fmr", "estimated_fmr",
                                                       "decision", "model_sha256") if k in threshold}
    return meta


# ------------------------------------------------------------------------------------------------ writers

def _write_onnx(module: nn.Module, example: torch.Tensor, tmp: Path, meta: Dict[str, Any], opset: int,
                dynamic_hw: bool) -> None:
    import onnx

    dims = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
    if dynamic_hw:
        dims.update({1: torch.export.Dim("height", min=8, max=8192), 2: torch.export.Dim("width", min=8, max=8192)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes={"x": dims}, dynamo=True, opset_version=opset, verbose=False,
                          external_data=False)
    proto = onnx.load(str(tmp))
    del proto.metadata_props[:]
    props = {METADATA_KEY: json.dumps(meta)}
    props.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()
                  if isinstance(v, (str, int, float, bool, list))})
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"PartReID {meta['arch']} features: {meta['input']} -> global (N, D), parts (N, P, Dp)"
    onnx.save(proto, str(tmp))


def _write_torchscript(module: nn.Module, example: torch.Tensor, tmp: Path, meta: Dict[str, Any]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"partreid.json": json.dumps(meta)})


def _runner(path: Path, fmt: str):
    """A function numpy input → (global, parts) numpy, running the exported file."""
    if fmt == "onnx":
        ort = import_onnxruntime()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")

    def run(x):
        with torch.no_grad():
            g, p = module(torch.from_numpy(x))
        return g.numpy(), p.numpy()

    return run


def read_torchscript_metadata(path) -> Dict[str, Any]:
    """The metadata record of an exported TorchScript file (its ``partreid.json`` extra file)."""
    import warnings

    extra = {"partreid.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["partreid.json"])


# ------------------------------------------------------------------------------------------- verification

def verification_crops(source=None, n: int = DEFAULT_VERIFY_IMAGES) -> List[Tuple[str, "object"]]:
    """``n`` real RGB crops (PIL images) spread evenly over a dataset spec, or over the repository's sample crops
    (``data/sample/vtest``) when ``source`` is None. Returns (name, image) pairs.

    Raises:
        InputError: no images found, or no source given and the sample crops are not installed.
    """
    from partreid.common.data import load_dataset

    if source is None:
        if not SAMPLE_CROPS.is_dir():
            raise InputError(f"the sample crops ({SAMPLE_CROPS}) are not installed; give --verify-data SPEC")
        source = f"luperson:{SAMPLE_CROPS}"
    ds = load_dataset(str(source), verbose=False)
    paths = list(ds.frame["path"])
    if not paths:
        raise InputError(f"{source}: no images to verify the export on")
    n = max(1, min(int(n), len(paths)))
    chosen = [paths[i] for i in np.unique(np.round(np.linspace(0, len(paths) - 1, n)).astype(int))]
    return [(p, ds.open_image(p)) for p in chosen]


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows along the last axis; (N, ...) → (N, ...) without the last axis."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a - b).sum(-1) == 0, 1.0, 0.0))


@dataclass
class VerificationReport:
    """Per-row agreement of an exported model with torch.

    Attributes:
        names: the crop of each row.
        global_cos: float64 (N,) cosine of the ``global`` rows.
        parts_cos: float64 (N,) minimum over parts of the cosine of the ``parts`` rows.
        max_abs_diff: largest absolute difference over all outputs.
        min_cosine: the pass mark.
    """

    names: List[str]
    global_cos: np.ndarray
    parts_cos: np.ndarray
    max_abs_diff: float
    min_cosine: float = DEFAULT_MIN_COSINE
    checks: List[str] = field(default_factory=list)

    @property
    def row_min(self) -> np.ndarray:
        """(N,) each row's minimum cosine over ``global`` and its parts."""
        return np.minimum(self.global_cos, self.parts_cos)

    @property
    def passed(self) -> bool:
        return bool(len(self.names)) and bool((self.row_min >= self.min_cosine).all())

    def format(self, rows: int = 0) -> str:
        """A readable summary: min/median cosine per output, the worst rows, the verdict."""
        r = self.row_min
        lines = [f"verification on {len(r)} real crops ({', '.join(self.checks)}): minimum cosine per row",
                 f"  global: min {self.global_cos.min():.7f}   parts: min {self.parts_cos.min():.7f}   "
                 f"max |diff| {self.max_abs_diff:.2e}"]
        order = np.argsort(r, kind="stable")
        show = order if rows <= 0 else order[:rows]
        lines += [f"  {r[i]:.7f}  {self.names[i]}" for i in show]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"  {verdict}: lowest row cosine {r.min():.7f} (pass mark {self.min_cosine})")
        return "\n".join(lines)


def verify_export(path, fmt: str, torch_module: nn.Module, crops, loaded: LoadedModel, *,
                  with_preprocessing: bool, min_cosine: float = DEFAULT_MIN_COSINE,
                  interpolation: str = "bicubic") -> VerificationReport:
    """Run the exported file and ``torch_module`` on the same real crops and compare their outputs row by row.

    Plain graphs get the pipeline's transform (:func:`partreid.common.extract.eval_transform`) in one batch;
    graphs with preprocessing get each uint8 crop at its own size (one call each) and then all crops resized
    to one common size in one batch, so that the dynamic batch and image sizes are both exercised.

    Returns:
        a :class:`VerificationReport`.
    """
    run = _runner(Path(path), fmt)
    inputs: List[Tuple[List[str], np.ndarray]] = []
    checks = []
    if with_preprocessing:
        for name, img in crops:
            inputs.append(([name], np.asarray(img, np.uint8)[None]))
        h, w = loaded.image_size
        common = (max(8, 2 * w), max(8, 2 * h))              # PIL size is (W, H)
        inputs.append(([f"{n} (resized, batch)" for n, _ in crops],
                       np.stack([np.asarray(img.resize(common), np.uint8) for _, img in crops])))
        checks = ["uint8 crops at their own sizes", f"a batch of {len(crops)}"]
    else:
        tf = eval_transform(loaded.image_size, loaded.pixel_mean, loaded.pixel_std, interpolation)
        inputs.append(([n for n, _ in crops], torch.stack([tf(img) for _, img in crops]).numpy()))
        checks = [f"a batch of {len(crops)}"]
    names, gcos, pcos, diff = [], [], [], 0.0
    torch_module = torch_module.eval()
    for batch_names, x in inputs:
        with torch.no_grad():
            tg, tp = (t.numpy() for t in torch_module(torch.from_numpy(x)))
        eg, ep = run(x)
        names += batch_names
        gcos.append(_row_cosines(eg, tg))
        pcos.append(_row_cosines(ep, tp).min(axis=1))
        diff = max(diff, float(np.abs(eg - tg).max()), float(np.abs(ep - tp).max()))
    return VerificationReport(names, np.concatenate(gcos), np.concatenate(pcos), diff, float(min_cosine), checks)


# ------------------------------------------------------------------------------------------------ export

@dataclass
class ExportResult:
    """What :func:`export_model` did: the file (None when verification failed), its metadata, the report."""

    path: Optional[Path]
    metadata: Dict[str, Any]
    report: Optional[VerificationReport]


def export_model(checkpoint: str, out, fmt: str = "onnx", *, fusion: str = "auto", neck: str = "after",
                 normalize: bool = True, with_preprocessing: bool = False, threshold_file=None,
                 arch: Optional[str] = None, image_size: Optional[Tuple[int, int]] = None,
                 opset: int = DEFAULT_OPSET, verify: bool = True, verify_data=None,
                 verify_images: int = DEFAULT_VERIFY_IMAGES, min_cosine: float = DEFAULT_MIN_COSINE
                 ) -> ExportResult:
    """Export a checkpoint to ONNX or TorchScript, then verify it against torch on real crops.

    Args:
        checkpoint: anything :func:`partreid.common.models.loader.load_model` accepts (PASS export or run,
            official PASS checkpoint, finetune ``last.pth``, timm ViT, torchvision ResNet-50, ``random:ARCH``).
        out: destination file; written atomically, and only when verification passes (or is off).
        fmt: ``onnx`` or ``torchscript``.
        fusion: ``auto`` (as ``extract-features``), ``cls``, ``cat`` or ``mean``; fine-tuned models keep theirs.
        neck: ``after``/``before`` the BNNeck (fine-tuned models).
        normalize: L2-normalise the outputs in the graph.
        with_preprocessing: uint8 NHWC input with resize + mean/std in the graph (module docstring).
        threshold_file: a ``calibrate`` result to embed in the metadata.
        arch, image_size: as for ``load_model``.
        opset: ONNX opset (≥ 18).
        verify: run the verification (see :func:`verify_export`).
        verify_data: dataset spec of the verification crops (default: the repository's sample crops).
        verify_images: number of crops.
        min_cosine: pass mark of the verification.

    Returns:
        an :class:`ExportResult`; ``path`` is None when verification failed (nothing was written).

    Raises:
        InputError: unknown format, unreadable checkpoint or threshold file, onnx/onnxruntime missing.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise InputError("ONNX export needs onnx and onnxscript: pip install 'partreid[export]'") from None
    threshold = None
    if threshold_file:
        from partreid.common.calibration import read_threshold

        threshold = read_threshold(threshold_file)
    loaded = load_model(checkpoint, arch=arch, image_size=image_size)
    fusion = resolve_fusion(loaded, fusion)
    head = FeatureHead(loaded, fusion, neck, normalize).eval()
    h, w = loaded.image_size
    module = WithPreprocessing(head, loaded.image_size, loaded.pixel_mean, loaded.pixel_std).eval() \
        if with_preprocessing else head
    torch.manual_seed(0)
    example = (torch.randint(0, 256, (2, 2 * h, 2 * w, 3), dtype=torch.uint8) if with_preprocessing
               else torch.randn(2, 3, h, w))
    with torch.no_grad():
        g, p = module(example)
    meta = export_metadata(loaded, checkpoint, fusion=fusion, neck=neck, normalize=normalize,
                           with_preprocessing=with_preprocessing, fmt=fmt,
                           dims={"global": [int(g.shape[1])], "parts": [int(p.shape[1]), int(p.shape[2])]},
                           threshold=threshold)
    crops = verification_crops(verify_data, verify_images) if verify else None
    out = Path(out)
    inputs = tuple(x for x in (checkpoint, threshold_file) if x and not str(x).startswith("random:"))
    report = None
    try:
        with atomic_path(out, inputs=inputs) as tmp:
            log.info("exporting %s (%s, %dx%d, fusion %s) to %s", loaded.source, loaded.arch, h, w, fusion, fmt)
            with torch.no_grad():
                if fmt == "onnx":
                    _write_onnx(module, example, tmp, meta, opset, with_preprocessing)
                else:
                    _write_torchscript(module, example, tmp, meta)
            if verify:
                report = verify_export(tmp, fmt, module, crops, loaded, with_preprocessing=with_preprocessing,
                                       min_cosine=min_cosine)
                if not report.passed:
                    raise _Unverified()      # atomic_path then removes the temporary file: nothing is installed
    except _Unverified:
        return ExportResult(None, meta, report)
    return ExportResult(out, meta, report)


class _Unverified(Exception):
    """Raised inside the atomic write when verification fails, so that the file is not installed."""
