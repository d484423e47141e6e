"""Fine-tuning settings: :class:`FinetuneConfig` and the reproduction presets, the one source of defaults.

``finetune``, ``cluster`` and ``refine-labels`` take their defaults from here (the command-line options read
:data:`PRESETS` and the :class:`FinetuneConfig` field defaults), and so does the epoch loop in
:mod:`partreid.pplr_finetune.train`. This module imports neither torch nor numpy, so commands that only
cluster start fast.

Defaults are those of the published code:

- ``pplr`` / ``pplr-cam`` / ``pplr-sgd``: PPLR (``examples/train_pplr.py``, ``train_pplr_cam.py``), 4-GPU
  ``nn.DataParallel`` (16 images per GPU for BatchNorm), float32 training and extraction.
- ``pass-usl``: PASS_cluster_contrast_reid ``market_usl_cat_singleneck.sh`` (4 GPUs, 64 images per GPU);
  ``pass-usl-msmt``: ``msmt_usl_mean_singleneck.sh`` (2 GPUs, 128 images per GPU, mean fusion, eps 0.7).
- ``pplr-cam-msmt``: PPLR-CAM with the README's MSMT17 values (eps 0.6, λ_cam 1.0). PPLR without camera labels
  uses the same settings on Market-1501 and MSMT17 (``pplr``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from partreid.common.errors import InputError

#: mixed-precision choices shared by every training/extraction path: autocast dtype, or none (float32).
#: 'auto' = bf16 where the GPU supports it, else fp16 with a GradScaler. On the CPU fp16 falls back to float32.
AMP_MODES = ("none", "fp16", "bf16", "auto")

#: hyper-parameter presets: the values that differ from :class:`FinetuneConfig`'s defaults (PPLR, Market).
PRESETS: Dict[str, Dict[str, Any]] = {
    # PPLR (CVPR'22): Adam 3.5e-4, wd 5e-4, StepLR 20/0.1, 50 epochs x 400 iterations, batch 64 = 16 x 4, eps 0.5.
    "pplr": {},
    # PPLR-CAM: + inter-camera proxy loss; README values for Market-1501 ...
    "pplr-cam": {"camera_aware": True, "eps": 0.4, "lambda_cam": 0.5},
    # ... and for MSMT17.
    "pplr-cam-msmt": {"camera_aware": True, "eps": 0.6, "lambda_cam": 1.0},
    # PPLR with SGD (momentum 0.9) instead of Adam (not a published setting).
    "pplr-sgd": {"optimizer": "sgd"},
    # PASS's own USL setting on Market (market_usl_cat_singleneck.sh): cluster-contrast hard memory loss, SGD
    # 3.5e-4, wd 5e-4, 50 epochs x 200 iterations, batch 256 = 32 x 8 on 4 GPUs, eps 0.6, cat fusion, single
    # neck, mean/std 0.5, drop_path 0.3.
    "pass-usl": {"loss": "cluster-contrast", "optimizer": "sgd", "iters": 200, "batch_size": 256,
                 "num_instances": 8, "eps": 0.6, "fusion": "cat", "normalization": "half", "drop_path": 0.3,
                 "bn_batch": 64},
    # PASS's USL setting on MSMT17 (msmt_usl_mean_singleneck.sh): mean fusion, eps 0.7, 2 GPUs, eval-step 50.
    "pass-usl-msmt": {"loss": "cluster-contrast", "optimizer": "sgd", "iters": 200, "batch_size": 256,
                      "num_instances": 8, "eps": 0.7, "fusion": "mean", "normalization": "half",
                      "drop_path": 0.3, "bn_batch": 128, "eval_every": 50},
}

#: the presets that ``cluster`` / ``refine-labels`` accept (every preset carries clustering settings)
CLUSTER_PRESETS = tuple(PRESETS)
#: FinetuneConfig fields that ``cluster`` and ``refine-labels`` take from a preset
CLUSTER_KEYS = ("k1", "k2", "eps", "min_samples", "convention", "knn")
REFINE_KEYS = ("k",)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs; the field defaults are PPLR's published settings.

    Precision: ``amp`` 'none' (float32, as PPLR and cluster-contrast train and extract), or 'fp16'/'bf16'/'auto'
    autocast on CUDA (fp16 with a GradScaler); the per-epoch feature extraction uses the same precision.
    BatchNorm: ``bn_groups`` 'auto' splits each process's batch into ghost-BN groups of ``bn_batch`` images
    (16 for PPLR = 64 / 4 GPUs, 64 for pass-usl), the per-GPU batch of the reference's nn.DataParallel, at
    any world size; an int forces the group count (1 = plain BatchNorm over the process's batch).
    """

    checkpoint: str = ""
    data: str = ""
    arch: Optional[str] = None
    fusion: str = "cat"
    image_size: Optional[Tuple[int, int]] = None
    normalization: str = "checkpoint"  # checkpoint | imagenet | half (mean/std 0.5, PASS's "--self-norm")
    epochs: int = 50
    iters: int = 400
    batch_size: int = 64
    num_instances: int = 4
    optimizer: str = "adam"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    step_size: int = 20
    gamma: float = 0.1
    loss: str = "pplr"  # pplr | cluster-contrast
    k1: int = 30
    k2: int = 6
    eps: float = 0.5
    min_samples: int = 4
    convention: str = "reference"
    knn: str = "exact"
    k: int = 20
    beta: float = 0.5
    aals_epoch: int = 5
    label_smooth: float = 0.1
    triplet_feature: str = "bnneck-output"  # PPLR's f_g is post-BN; "bnneck-input" = pre-BN (TransReID)
    camera_aware: bool = False
    lambda_cam: float = 0.5
    cam_temperature: float = 0.07
    cam_negatives: int = 50
    memory_temperature: float = 0.05
    memory_momentum: float = 0.2
    drop_path: float = 0.0
    bn_groups: Union[int, str] = "auto"
    bn_batch: int = 16  # images per GPU in the reference run (BatchNorm batch emulated by bn_groups 'auto')
    classifier_capacity: int = 0  # 0 = grow on demand (single process); set e.g. 3000 under DDP
    eval_every: int = 5
    eval_data: Optional[str] = None
    workers: int = 2
    seed: int = 1
    device: str = "auto"
    amp: str = "none"
    labels: Optional[str] = None  # train the first epoch on these refined labels instead of clustering
    keep_intermediate: Optional[str] = None
    resume: bool = False
    resnet_weights: Optional[str] = None
    random_init: bool = False  # allow --arch resnet50 without ImageNet weights
    log_every: int = 20
    progress: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str = "pplr", **overrides) -> "FinetuneConfig":
        """A config with the preset's values, then ``overrides`` (None values are ignored).

        Raises:
            InputError: unknown preset or option, or a bad ``amp``/``bn_groups`` value.
        """
        values = preset_values(preset)
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise InputError(f"unknown fine-tuning option(s): {', '.join(sorted(unknown))}")
        cfg = cls(**values)
        if cfg.amp not in AMP_MODES:
            raise InputError(f"amp {cfg.amp!r} not in {', '.join(AMP_MODES)}")
        parse_bn_groups(cfg.bn_groups)
        return cfg


def preset_values(preset: str) -> Dict[str, Any]:
    """The values a preset sets (a copy).

    Raises:
        InputError: unknown preset.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return dict(PRESETS[preset])


def default(key: str, preset: str = "pplr") -> Any:
    """The value of FinetuneConfig field ``key`` under ``preset`` (the preset's, else the field default)."""
    values = preset_values(preset)
    if key in values:
        return values[key]
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == key:
            return f.default
    raise KeyError(key)


def describe_default(key: str) -> str:
    """'0.5; pplr-cam 0.4; pass-usl 0.6' — the default of ``key`` and the presets that change it (for --help)."""
    base = default(key)
    text = f"{base}"
    for name, values in PRESETS.items():
        if key in values and values[key] != base:
            text += f"; {name} {values[key]}"
    return text


def parse_bn_groups(value: Union[int, str]) -> Union[int, str]:
    """'auto' or an int ≥ 1 (also from a string such as '4').

    Raises:
        InputError: anything else.
    """
    if value == "auto":
        return "auto"
    try:
        groups = int(value)
    except (TypeError, ValueError):
        groups = 0
    if isinstance(value, bool) or groups < 1 or str(groups) != str(value).strip():
        raise InputError(f"bn groups must be 'auto' or an integer >= 1, got {value!r}")
    return groups


def resolve_bn_groups(bn_groups: Union[int, str], batch_size: int, world_size: int, bn_batch: int
                      ) -> Tuple[int, str]:
    """Ghost-BN group count for this process, and a log line saying what BatchNorm sees.

    With 'auto', each process's share of the global batch (``batch_size / world_size``) is split into groups of
    ``bn_batch`` images, the per-GPU batch of the reference run (PPLR: 64 on 4 GPUs → 16), so the statistics are
    those of the published runs whatever the number of processes (groups = per-process batch // bn_batch, at
    least 1; contiguous chunks as ``torch.chunk``, i.e. nn.DataParallel's scatter). An int is used as given.

    Raises:
        InputError: bad ``bn_groups``.
    """
    groups = parse_bn_groups(bn_groups)
    per_process = int(batch_size) // max(int(world_size), 1)
    if groups == "auto":
        groups = max(1, per_process // int(bn_batch))
        how = f"auto: the reference's {bn_batch} images per GPU"
        if per_process % int(bn_batch) and per_process > int(bn_batch):
            how += f"; {per_process} is not a multiple of {bn_batch}, so the groups are uneven"
        elif per_process < int(bn_batch):
            how += f"; the per-process batch {per_process} is smaller, so one group"
    else:
        how = "as given"
    size = -(-per_process // groups)
    return groups, (f"BatchNorm: {groups} ghost group(s) of {size} images per process ({how}; global batch "
                    f"{batch_size} over {world_size} process(es))")
