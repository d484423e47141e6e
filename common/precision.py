"""Mixed-precision vocabulary shared by every stage (no torch import: the command-line options read it).

``none`` = float32 throughout; ``fp16`` = float16 autocast with a GradScaler when training (PASS's published
runs, ``--use_fp16``); ``bf16`` = bfloat16 autocast, no scaler (also runs on the CPU); ``auto`` = bf16 where the
GPU supports it, else fp16. :func:`partreid.common.distributed.resolve_amp` turns a mode into a dtype.
"""

AMP_MODES = ("none", "fp16", "bf16", "auto")
