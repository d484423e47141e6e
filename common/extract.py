"""Feature extraction: images → global and part features → a features file (the HDF5 contract).

The same functions serve ``extract-features``, ``evaluate --checkpoint`` and every epoch of ``finetune``.

Feature definitions (PASS-reID ``TR/model/make_model.py`` ``build_transformer_pass``; PPLR
``pplr/models/resnet_part.py`` ``ResNetPart``; PPLR ``examples/train_pplr.py`` ``extract_all_features``):

- ViT backbone (PASS): ``fusion='cls'`` gives the [CLS] output; ``'cat'`` gives [f_cls ; mean(f_part)]
  (2D); ``'mean'`` gives (f_cls + mean(f_part))/2 (D). Parts are the three [PART] outputs.
- ResNet-50 stripes (PPLR): the global feature is the GAP of layer 4 (fusion ``'cls'``); parts are the three
  horizontal stripes.
- Fine-tuned model (BNNecks): its own fusion; ``neck='after'`` (PPLR's retrieval feature) or ``'before'``.
- ``flip=True`` averages the features of the image and its horizontal mirror before normalisation.
- ``normalize=True`` L2-normalises the global feature and each part row; recorded in the file.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from tqdm import tqdm

from partreid.common.data.decode import open_image_file
from partreid.common.data.images import ImageDataset, collate_skip_none
from partreid.common.distributed import autocast, rank as dist_rank, resolve_device, world_size as dist_world_size
from partreid.common.errors import InputError
from partreid.common.h5io import FeaturesWriter
from partreid.common.models.loader import LoadedModel, load_model
from partreid.common.models.reid import fuse_features

log = logging.getLogger("partreid.extract")


def eval_transform(image_size: Tuple[int, int], mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bicubic"):
    """The papers' test transform: resize to (H, W) pixels, to tensor, normalise with the checkpoint's mean/std.

    Returns:
        a torchvision transform mapping a PIL image to a float32 tensor (3, H, W).
    """
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    return T.Compose([T.Resize(tuple(image_size), interpolation=interp), T.ToTensor(),
                      T.Normalize(mean=list(mean), std=list(std))])


def resolve_fusion(loaded: LoadedModel, fusion: str) -> str:
    """``'auto'`` → ``'cat'`` for a ViT (PASS's retrieval feature [f_cls ; mean(f_part)], PASS-reID
    ``TR/model/make_model.py`` ``neck_feat``), ``'cls'`` for ResNet-50 (PPLR uses the GAP feature) and for
    fine-tuned models (they carry their own fusion); any other value is returned unchanged."""
    if fusion != "auto":
        return fusion
    return "cat" if loaded.kind == "vit" else "cls"


@dataclass
class FeatureOptions:
    """How features are formed. ``fusion`` is ignored for fine-tuned models (they carry their own)."""

    fusion: str = "cls"
    neck: str = "after"
    flip: bool = False
    normalize: bool = True
    parts: bool = True


@torch.no_grad()
def compute_batch(loaded: LoadedModel, images: torch.Tensor, opts: FeatureOptions
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Features of one batch.

    Args:
        loaded: the model.
        images: float (B, 3, H, W), already normalised, on the model's device.
        opts: fusion, neck, flip, normalisation.

    Returns:
        (global (B, Dg) float32, parts (B, P, Dp) float32 or None), on the CPU.
    """

    def once(x):
        if loaded.kind == "reid":
            g, p = loaded.model.extract(x, neck=opts.neck)
        elif loaded.kind == "onnx":                      # exported graph: features already fused
            g, p = loaded.model(x)
        else:
            g, p = loaded.model(x)
            g = fuse_features(g, p, opts.fusion)
        return g.float(), p.float()

    g, p = once(images)
    if opts.flip:
        g2, p2 = once(torch.flip(images, dims=[3]))
        g, p = (g + g2) / 2, (p + p2) / 2
    if opts.normalize:
        g = F.normalize(g, dim=1)
        p = F.normalize(p, dim=2)
    return g.cpu(), (p.cpu() if opts.parts else None)


def extract_to_file(loaded: LoadedModel, ds, frame, out, *, split: str = "", opts: Optional[FeatureOptions] = None,
                    batch_size: int = 64, workers: int = 2, device: str = "cpu", resume: bool = False,
                    strict: bool = False, interpolation: str = "bicubic", command: str = "",
                    inputs: Sequence = (), progress: bool = True, amp: str = "none") -> Path:
    """Extract the features of ``frame``'s images and write a features file.

    Rows are written in chunks (one per global batch) to a partial file; with ``resume=True`` a killed run
    continues after the last completed chunk. Under ``torchrun`` each rank computes its share of every global
    batch and rank 0 writes the one file (other ranks return ``out`` without writing).

    Args:
        loaded: the model (see :func:`common.models.loader.load_model`).
        ds: the dataset (``partreid.common.data.ReIDDataset``), used to open images and for provenance.
        frame: the rows to extract (columns path, pid, camid), in output order.
        out: destination ``.h5``.
        split: split name recorded in the file.
        opts: feature options.
        batch_size: images per forward pass (per rank).
        workers: DataLoader worker processes.
        device: ``cpu`` or ``cuda[:i]``.
        amp: precision of the forward pass (:data:`partreid.common.precision.AMP_MODES`): 'none' = float32, the
            published code's (default); a training run passes its own mode. Features are stored as float32.
        resume, strict: see above; ``strict`` fails on an unreadable image instead of skipping it.

    Returns:
        ``out``.

    Raises:
        InputError: empty selection, or an unreadable image with ``strict=True``.
    """
    opts = opts or FeatureOptions()
    if len(frame) == 0:
        raise InputError(f"{getattr(ds, 'spec', ds)}: no images in split {split or 'all'!r}")
    model = loaded.model.to(device).eval()
    rank, world = dist_rank(), dist_world_size()
    transform = eval_transform(loaded.image_size, loaded.pixel_mean, loaded.pixel_std, interpolation)
    images = ImageDataset(ds, frame, transform, strict=strict)

    # probe shapes on one synthetic batch (cheap) to size the file's datasets
    probe = torch.zeros(1, 3, *loaded.image_size, device=device)
    with autocast(device, amp):
        g0, p0 = compute_batch(loaded, probe, opts)
    attrs = {
        "normalized": bool(opts.normalize), "dataset": getattr(ds, "spec", ""), "dataset_root": str(ds.root),
        "dataset_fingerprint": getattr(ds, "fingerprint", ""), "split": split, "model_sha256": loaded.sha256,
        "model_source": loaded.source, "arch": loaded.arch, "image_size": list(loaded.image_size),
        "pixel_mean": list(loaded.pixel_mean), "pixel_std": list(loaded.pixel_std),
        "fusion": loaded.meta.get("fusion", opts.fusion) if loaded.kind in ("reid", "onnx") else opts.fusion,
        "neck": loaded.meta.get("neck", "none") if loaded.kind == "onnx" else opts.neck if loaded.has_bnneck
        else "none", "flip": bool(opts.flip),
        "options": f"{opts}|{interpolation}", "command": command,
    }
    writer = None
    start = 0
    if rank == 0:
        writer = FeaturesWriter(out, list(frame["path"]), frame["pid"].to_numpy(), frame["camid"].to_numpy(),
                                g0.shape[1], None if p0 is None else tuple(p0.shape[1:]), attrs, resume=resume,
                                inputs=inputs)
        start = writer.rows_done
        if start:
            log.info("resuming %s at row %d of %d", out, start, len(frame))
    if world > 1:
        box = [start]
        torch.distributed.broadcast_object_list(box, src=0)
        start = box[0]

    global_batch = batch_size * world
    n = len(frame)

    bar = tqdm(total=n, initial=start, unit="img", desc=f"extract {split or ''}".strip(),
               disable=not progress or rank != 0, leave=False)
    try:
        for chunk_start in range(start, n, global_batch * 16):
            chunk_stop = min(n, chunk_start + global_batch * 16)
            # this rank's rows of each global batch, in order
            mine = [i for b in range(chunk_start, chunk_stop, global_batch)
                    for i in range(b + rank * batch_size, min(b + (rank + 1) * batch_size, chunk_stop))]
            loader = DataLoader(Subset(images, mine), batch_size=batch_size, shuffle=False, num_workers=workers,
                                collate_fn=collate_skip_none, pin_memory=device.startswith("cuda"))
            rows_g, rows_p, got = [], [], []
            for batch_images, idx in loader:
                if len(idx):
                    with autocast(device, amp):
                        g, p = compute_batch(loaded, batch_images.to(device, non_blocking=True), opts)
                    rows_g.append(g.numpy())
                    rows_p.append(None if p is None else p.numpy())
                    got.append(idx.numpy())
                if rank == 0:
                    bar.update(len(idx) * world)
            result = _assemble(chunk_start, chunk_stop, rows_g, rows_p, got, g0.shape[1],
                               None if p0 is None else tuple(p0.shape[1:]), world)
            if rank == 0:
                writer.write(chunk_start, *result)
        bar.close()
        if rank == 0:
            skipped = int(writer.f["skipped"][...].sum())
            if skipped:
                log.warning("%d unreadable image(s) were skipped (see the warnings above)", skipped)
            return writer.finish()
        return Path(out)
    except BaseException:
        bar.close()
        if writer is not None:
            writer.close()
        raise


def _assemble(start, stop, rows_g, rows_p, got, dim, parts_shape, world):
    """Gather this chunk's rows from every rank and put them in order; unreadable rows are marked skipped."""
    g = np.concatenate(rows_g) if rows_g else np.zeros((0, dim), np.float32)
    p = (np.concatenate(rows_p) if rows_p and rows_p[0] is not None else None)
    idx = np.concatenate(got) if got else np.zeros(0, np.int64)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (g, p, idx))
        g = np.concatenate([x[0] for x in gathered])
        got_p = [x[1] for x in gathered if x[1] is not None]  # a rank without rows this chunk sends None
        p = np.concatenate(got_p) if got_p else None
        idx = np.concatenate([x[2] for x in gathered])
    count = stop - start
    out_g = np.zeros((count, dim), np.float32)
    out_p = None if parts_shape is None else np.zeros((count,) + parts_shape, np.float32)
    skipped = np.ones(count, bool)
    local = idx - start
    out_g[local] = g
    if out_p is not None and p is not None:
        out_p[local] = p
    skipped[local] = False
    return out_g, out_p, skipped


def extract_arrays(loaded: LoadedModel, ds, frame, *, opts: Optional[FeatureOptions] = None, batch_size: int = 64,
                   workers: int = 2, device: str = "cpu", interpolation: str = "bicubic", progress: bool = True,
                   amp: str = "none") -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """In-memory variant of :func:`extract_to_file` (single process; ``amp`` as there, float32 by default).

    Returns:
        (global (N', Dg) float32, parts (N', P, Dp) float32 or None, kept (N',) int64 row indices into ``frame``;
        unreadable images are left out).
    """
    opts = opts or FeatureOptions()
    model = loaded.model.to(device).eval()
    transform = eval_transform(loaded.image_size, loaded.pixel_mean, loaded.pixel_std, interpolation)
    loader = DataLoader(ImageDataset(ds, frame, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_skip_none)
    gs, ps, ids = [], [], []
    for images, idx in tqdm(loader, total=math.ceil(len(frame) / batch_size), unit="batch", leave=False,
                            disable=not progress, desc="extract"):
        if len(idx) == 0:
            continue
        with autocast(device, amp):
            g, p = compute_batch(loaded, images.to(device), opts)
        gs.append(g.numpy())
        ps.append(None if p is None else p.numpy())
        ids.append(idx.numpy())
    if not gs:
        raise InputError("no readable images to extract")
    parts = np.concatenate(ps) if ps[0] is not None else None
    return np.concatenate(gs), parts, np.concatenate(ids)


ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class FeatureExtractor:
    """Features of images in memory or on disk, in one call (like torchreid's ``FeatureExtractor``).

    ``FeatureExtractor(model_path="backbone.pth", device="cuda")(["a.jpg", "b.jpg"])`` returns
    ``{"global": (N, D) float32, "parts": (N, P, Dp) float32}`` NumPy arrays, row i for input i: the features
    ``extract-features`` would write for the same images and options (same model loader, test transform, fusion
    and normalisation; see the module docstring for the definitions).

    Args:
        model_path: any checkpoint :func:`partreid.common.models.loader.load_model` accepts (a PASS backbone,
            a ``pass-pretrain`` run checkpoint or export, a ``finetune`` model, a timm ViT or torchvision
            ResNet-50 state dict) or ``random:ARCH`` (e.g. ``random:vit_tiny``) for a randomly initialised model.
        model: instead of ``model_path``, an already loaded :class:`~partreid.common.models.loader.LoadedModel`.
        device: ``'auto'`` (CUDA when available, else CPU), ``'cpu'`` or ``'cuda[:i]'``. On CUDA the forward pass
            runs under autocast (bf16 where supported); outputs are float32 either way.
        fusion: global feature of a ViT backbone: ``'auto'`` (``'cat'``: [f_cls ; mean(f_part)], 2D wide),
            ``'cls'`` (D) or ``'mean'`` (D); ignored by fine-tuned models, which carry their own.
        neck: fine-tuned models: ``'after'`` (BNNeck output, PPLR's retrieval feature) or ``'before'``.
        flip: average each image's features with those of its horizontal mirror (before normalisation).
        normalize: L2-normalise the global feature and each part feature (rows of unit length).
        batch_size: images per forward pass.
        arch, image_size: force the architecture or the input (H, W) in pixels (default: from the checkpoint).
        interpolation: resize filter, ``'bicubic'`` (the papers') or ``'bilinear'``.

    Inputs (``__call__``), one item or a list/tuple of items, which may be mixed:

    - a path (str or ``os.PathLike``) to an image file;
    - a ``PIL.Image.Image`` (any mode; converted to RGB);
    - a NumPy ``uint8`` array, H×W×3 RGB (one image) or N×H×W×3 (a batch of images);
    - a ``torch.Tensor``, float (3, H, W) or (N, 3, H, W), taken as model input as it is: already resized to
      :attr:`image_size` and normalised with :attr:`pixel_mean` / :attr:`pixel_std`.

    Paths, PIL images and arrays go through the test transform of the checkpoint: resize to (H, W), scale to
    [0, 1], normalise with its mean/std.

    Returns (``__call__``):
        dict with ``"global"``: float32 (N, D) and ``"parts"``: float32 (N, P, Dp) NumPy arrays (P = 3).

    Raises:
        InputError: an unreadable image file, an array that is not uint8 H×W×3, a tensor of the wrong shape,
            no input, or a bad checkpoint (from the loader).
    """

    def __init__(self, model_path: Optional[str] = None, *, model: Optional[LoadedModel] = None,
                 device: str = "auto", fusion: str = "auto", neck: str = "after", flip: bool = False,
                 normalize: bool = True, batch_size: int = 64, arch: Optional[str] = None,
                 image_size: Optional[Tuple[int, int]] = None, interpolation: str = "bicubic"):
        if (model_path is None) == (model is None):
            raise InputError("FeatureExtractor needs model_path or model (one of them)")
        self.loaded = model if model is not None else load_model(str(model_path), arch=arch, image_size=image_size)
        self.device = resolve_device(device)
        self.options = FeatureOptions(fusion=resolve_fusion(self.loaded, fusion), neck=neck, flip=flip,
                                      normalize=normalize, parts=True)
        self.batch_size = max(1, int(batch_size))
        self.transform = eval_transform(self.loaded.image_size, self.loaded.pixel_mean, self.loaded.pixel_std,
                                        interpolation)
        self.loaded.model.to(self.device).eval()

    @property
    def image_size(self) -> Tuple[int, int]:
        """Model input (H, W) in pixels."""
        return self.loaded.image_size

    @property
    def pixel_mean(self) -> Tuple[float, float, float]:
        """RGB mean (0-1 scale) the inputs are normalised with."""
        return self.loaded.pixel_mean

    @property
    def pixel_std(self) -> Tuple[float, float, float]:
        """RGB standard deviation (0-1 scale) the inputs are normalised with."""
        return self.loaded.pixel_std

    def _to_tensors(self, item: ImageInput) -> torch.Tensor:
        """One input item → float (n, 3, H, W) model input."""
        if isinstance(item, torch.Tensor):
            x = item.detach()
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != 3:
                raise InputError(f"a tensor input must be (3, H, W) or (N, 3, H, W), got {tuple(x.shape)}")
            return x.float()
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim not in (3, 4) or item.shape[-1] != 3:
                raise InputError(f"an array input must be uint8 H×W×3 or N×H×W×3 (RGB), got {item.dtype} "
                                 f"{item.shape}")
            batch = item[None] if item.ndim == 3 else item
            return torch.stack([self.transform(Image.fromarray(np.ascontiguousarray(a), "RGB")) for a in batch])
        if isinstance(item, Image.Image):
            return self.transform(item.convert("RGB")).unsqueeze(0)
        if isinstance(item, (str, os.PathLike)):
            try:
                image = open_image_file(item)
            except OSError as exc:
                raise InputError(str(exc).splitlines()[0]) from None
            return self.transform(image).unsqueeze(0)
        raise InputError(f"cannot extract features from a {type(item).__name__}: give paths, PIL images, "
                         f"uint8 H×W×3 arrays or tensors")

    @torch.no_grad()
    def __call__(self, inputs) -> Dict[str, np.ndarray]:
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if not items:
            raise InputError("no images given")
        gs, ps, pending, count = [], [], [], 0

        def flush():
            x = torch.cat(pending).to(self.device)
            with autocast(self.device):
                g, p = compute_batch(self.loaded, x, self.options)
            gs.append(g.numpy())
            ps.append(p.numpy())
            pending.clear()

        for item in items:
            x = self._to_tensors(item)
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start:start + self.batch_size]
                if pending and (count + chunk.shape[0] > self.batch_size or pending[0].shape[2:] != chunk.shape[2:]):
                    flush()
                    count = 0
                pending.append(chunk)
                count += chunk.shape[0]
        if pending:
            flush()
        return {"global": np.concatenate(gs), "parts": np.concatenate(ps)}

    def __repr__(self) -> str:
        return (f"FeatureExtractor({self.loaded.arch}, {self.loaded.source}, input {self.image_size[0]}x"
                f"{self.image_size[1]}, fusion={self.options.fusion}, device={self.device})")
