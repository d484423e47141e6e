"""PASS pre-training settings: :class:`PassConfig`, the one source of defaults (``pass-pretrain`` reads its
option defaults from here). No torch import, so the command line starts fast."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from partreid.common.errors import InputError
from partreid.common.precision import AMP_MODES

log = logging.getLogger("partreid.pass")

CLIP_MODES = ("per-tensor", "global", "none")


@dataclass
class PassConfig:
    """Hyper-parameters of PASS pre-training; defaults are the paper's ViT-S run (PASS ``main_pass.py`` and
    ``script/*.sh``).

    Model: ``arch`` (vit_tiny/vit_small/vit_base), ``depth`` (12; smaller for tests), ``image_size`` (256, 128)
    global views, ``local_size`` (128, 64) local crops, ``drop_path_rate`` 0.1 (student; teacher 0),
    ``pass_scale_quirk`` (False: position table resized to the explicit grid, see
    :func:`common.models.vit.resize_pos_grid`).
    Heads (PASS ``vision_transformer.py`` ``DINOHead``): ``out_dim`` 65536, ``hidden_dim`` 2048, ``bottleneck_dim`` 256, ``use_bn_in_head`` False,
    ``norm_last_layer`` True.
    Crops (PASS ``main_pass.py`` ``DataAugmentationDINO``): ``global_crops_scale`` (0.4, 1.0), ``local_crops_scale`` (0.1, 0.8), ``local_crops_per_band`` 3.
    Loss (PASS ``main_pass.py`` ``DINOLoss``): ``student_temp`` 0.1, ``teacher_temp`` 0.04, ``warmup_teacher_temp`` 0.04,
    ``warmup_teacher_temp_epochs`` 0, ``center_momentum`` 0.9.
    Optimisation (PASS ``main_pass.py`` ``train_dino``, ``utils.py`` ``cosine_scheduler``): ``epochs`` 100, ``batch_size`` 128 images per process, ``lr`` 5e-4 (scaled by
    global batch / 256), ``min_lr`` 1e-6, ``warmup_epochs`` 10, ``weight_decay`` 0.04 → ``weight_decay_end`` 0.4,
    ``momentum_teacher`` 0.996 → 1, ``clip_grad`` 3.0 with ``clip_mode`` 'per-tensor' (the reference; or
    'global', 'none'), ``freeze_last_layer`` 1 epoch, ``amp`` 'fp16' (float16 autocast with a GradScaler, as the
    published runs' ``--use_fp16``; on the CPU float32; 'bf16', 'auto' and 'none' are options), ``seed`` 0.
    Run: ``num_workers`` data-loader processes, ``device`` 'auto'|'cpu'|'cuda', ``checkpoint_every``
    iterations (0: epoch ends only), ``snapshot_every`` epochs (keep ``checkpoint{epoch:04d}.pth``; 0 off),
    ``stop_after_iters`` (stop with a checkpoint after this many iterations in total; schedules still span
    ``epochs``), ``export_on_finish`` (write ``teacher_backbone.pth`` at the end), ``progress`` (tqdm on stderr).
    """

    arch: str = "vit_small"
    depth: int = 12
    image_size: Tuple[int, int] = (256, 128)
    local_size: Tuple[int, int] = (128, 64)
    patch_size: int = 16
    drop_path_rate: float = 0.1
    pass_scale_quirk: bool = False
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    global_crops_scale: Tuple[float, float] = (0.4, 1.0)
    local_crops_scale: Tuple[float, float] = (0.1, 0.8)
    local_crops_per_band: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    epochs: int = 100
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0
    clip_mode: str = "per-tensor"
    freeze_last_layer: int = 1
    amp: str = "fp16"
    seed: int = 0
    num_workers: int = 4
    device: str = "auto"
    checkpoint_every: int = 1000
    snapshot_every: int = 0
    stop_after_iters: Optional[int] = None
    export_on_finish: bool = True
    progress: bool = True
    augment_on: str = "auto"  # 'cpu' (PIL in the workers), 'device' (batched on the training device), 'auto'

    def validate(self) -> "PassConfig":
        """Check value ranges; raises InputError with a one-line message. Returns self."""
        if self.clip_mode not in CLIP_MODES:
            raise InputError(f"clip_mode {self.clip_mode!r} not in {CLIP_MODES}")
        if self.amp not in AMP_MODES:
            raise InputError(f"amp {self.amp!r} not in {', '.join(AMP_MODES)}")
        for name in ("epochs", "batch_size", "out_dim", "depth"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.warmup_epochs < 0 or self.warmup_teacher_temp_epochs < 0:
            raise InputError("warm-up epochs must be >= 0")
        for name in ("image_size", "local_size"):
            h, w = getattr(self, name)
            if h % self.patch_size or w % self.patch_size:
                raise InputError(f"{name} {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "PassConfig":
        """Build from a dict (e.g. a checkpoint's ``config``); unknown keys raise InputError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown PASS config keys: {', '.join(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fixed)


