"""Models shared by both stages: the architecture table (``archs``), the checkpoint reader (``checkpoint``), the
loader (``loader``), the backbones (``vit``, ``resnet``) and the re-ID head (``reid``).

Import the concrete modules directly, e.g. ``from partreid.common.models.vit import PartViT``; this package file
stays import-free, so that reading the architecture table never loads torch.
"""
