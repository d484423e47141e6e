"""Image decoding with Pillow: whole RGB images, and bounded uint8 arrays for the device-side augmentation.

Unreadable images (missing, truncated, not an image) raise ``OSError`` whose message starts with the image's
name. This module does not import torch, so that dataset loading stays light.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Tuple, Union

import numpy as np
from PIL import Image

# What Pillow raises on damaged data besides OSError: broken PNG chunks raise SyntaxError, some truncated
# headers struct.error or EOFError, absurd sizes DecompressionBombError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

Source = Union[str, os.PathLike, io.BytesIO]


def _load_rgb(source: Source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            return im.convert("RGB")  # forces the full decode while the file is open
    except FileNotFoundError:
        raise OSError(f"{name}: image file not found") from None
    except DECODE_ERRORS as exc:
        raise OSError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from exc


def open_image_file(path: Union[str, os.PathLike]) -> Image.Image:
    """Read an image file fully into an RGB ``PIL.Image.Image`` (W×H, uint8, 3 channels).

    Raises:
        OSError: missing, truncated or undecodable file; the message starts with the path.
    """
    return _load_rgb(path, str(path))


def decode_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (e.g. the JPEG stored in LUPerson's LMDB) into an RGB ``PIL.Image.Image``.

    Args:
        data: the encoded file content.
        name: how to name the image in error messages.

    Raises:
        OSError: the bytes are not a decodable image.
    """
    return _load_rgb(io.BytesIO(data), name)


def bounded_size(height: int, width: int, max_height: int) -> Tuple[int, int]:
    """(h, w) of an image of ``height``×``width`` shrunk, keeping its aspect ratio, to at most ``max_height``
    rows (unchanged when already small enough; ``max_height`` <= 0 means no bound). Each side is at least 1."""
    if max_height <= 0 or height <= max_height:
        return height, width
    return max_height, max(1, round(width * max_height / height))


def decode_bounded(source: Source, name: str, max_height: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Decode an image into an RGB uint8 array of at most ``max_height`` rows, as cheaply as possible.

    JPEGs are decoded with Pillow's ``Image.draft`` (libjpeg DCT scaling by 1/2, 1/4 or 1/8), which skips most
    of the decode work for images at least twice the bound; the remainder is a Pillow ``reduce``/``resize``
    (box filter, i.e. area averaging) to exactly :func:`bounded_size`. Smaller images are returned at full size.

    Args:
        source: a file path or a ``BytesIO`` of the encoded bytes.
        name: how to name the image in error messages.
        max_height: bound on the returned height (0: no bound, full resolution).

    Returns:
        (array H'×W'×3 uint8 C-contiguous, (H, W) the full-resolution size of the image).

    Raises:
        OSError: missing, truncated or undecodable image; the message starts with ``name``.
    """
    try:
        with Image.open(source) as im:
            width, height = im.size
            th, tw = bounded_size(height, width, max_height)
            if (th, tw) != (height, width) and im.format == "JPEG":
                im.draft("RGB", (tw, th))  # DCT scaling: result still >= the requested size
            img = im.convert("RGB")
    except FileNotFoundError:
        raise OSError(f"{name}: image file not found") from None
    except DECODE_ERRORS as exc:
        raise OSError(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from exc
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.BOX)
    return np.asarray(img), (height, width)
