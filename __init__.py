"""PartReID: PASS part-aware self-supervised pre-training and PPLR unsupervised fine-tuning for person re-ID.

The repository root is this package: setuptools maps it to ``partreid`` (see ``setup.cfg``), so the folders
``common/``, ``pass_pretrain/``, ``pplr_finetune/`` and ``cli/`` are ``partreid.common`` and so on.
"""

from partreid.common import __version__

__all__ = ["__version__"]
