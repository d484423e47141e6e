"""An exported ONNX model (``partreid export --format onnx``) as a feature extractor, run by onnxruntime.

:func:`load_onnx_model` returns a :class:`partreid.common.models.loader.LoadedModel` of kind ``"onnx"`` whose
``model`` is an :class:`OnnxFeatureModel`: ``model(x)`` takes the float batch the extraction pipeline makes
(``(B, 3, H, W)``, resized and normalised with the mean/std recorded in the file) and returns the features
the graph computes, ``(global (B, D), parts (B, P, Dp))``, already fused (and L2-normalised when the file
says ``normalized``). So ``extract-features``, ``evaluate --checkpoint`` and the Python API run the same
pipeline on an ONNX file as on a torch checkpoint. Fusion and neck are fixed at export time. With ``flip``
the pipeline averages the graph's outputs, i.e. after the graph's normalisation (torch averages before it).

A graph exported ``--with-preprocessing`` takes uint8 ``(B, H', W', 3)`` RGB crops of any size; fed by the
pipeline it receives the pipeline's resized crop converted back to uint8 (``round(255 · (x · std + mean))``),
which its own resize leaves unchanged in size: the features then differ from the plain graph's by the uint8
rounding only.

Needs the ``export`` extra (``pip install 'partreid[export]'``: onnx, onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from partreid.common.errors import InputError
from partreid.common.fileio import sha256_file

#: Key of the JSON metadata record in the ONNX file's ``metadata_props``.
METADATA_KEY = "partreid"


def import_onnxruntime():
    """``onnxruntime``, or an InputError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("ONNX models need onnxruntime: pip install 'partreid[export]'") from None
    return onnxruntime


def read_onnx_metadata(path) -> Dict[str, Any]:
    """The PartReID metadata record of an exported ONNX file (arch, image_size, pixel_mean, pixel_std, fusion,
    neck, normalized, with_preprocessing, source_sha256, ...).

    Raises:
        InputError: unreadable file, or an ONNX file not written by ``partreid export``.
    """
    ort = import_onnxruntime()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise InputError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
    return _metadata(session, path)


def _metadata(session, path) -> Dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise InputError(f"{path}: this ONNX model has no PartReID metadata (export it with `partreid export`)")
    try:
        return json.loads(props[METADATA_KEY])
    except ValueError:
        raise InputError(f"{path}: its PartReID metadata is not valid JSON") from None


class OnnxFeatureModel(nn.Module):
    """onnxruntime session behind the ``model(x) -> (global, parts)`` interface of the extraction pipeline.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu`` or ``cuda[:i]`` (CUDA when onnxruntime has the CUDA provider; CPU otherwise).
    """

    def __init__(self, path, device: str = "cpu"):
        super().__init__()
        ort = import_onnxruntime()
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.meta = _metadata(self.session, path)
        self.input_name = self.session.get_inputs()[0].name
        self.register_buffer("mean", torch.tensor(self.meta["pixel_mean"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(self.meta["pixel_std"], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised float (B, 3, H, W) → (global (B, D), parts (B, P, Dp)) float32 CPU tensors."""
        x = x.detach().float().cpu()
        if self.meta.get("with_preprocessing"):
            x = ((x * self.std + self.mean) * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        g, p = self.session.run(["global", "parts"], {self.input_name: x.contiguous().numpy()})
        return torch.from_numpy(g), torch.from_numpy(p)


def load_onnx_model(path, device: str = "cpu"):
    """An exported ONNX file as a :class:`partreid.common.models.loader.LoadedModel` (kind ``"onnx"``).

    Raises:
        InputError: onnxruntime missing, unreadable file, or no PartReID metadata.
    """
    from partreid.common.models.loader import LoadedModel

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    model = OnnxFeatureModel(path, device=device).eval()
    meta = dict(model.meta)
    h, w = meta["image_size"]
    return LoadedModel(model, "onnx", str(meta.get("arch", "?")), (int(h), int(w)),
                       tuple(float(v) for v in meta["pixel_mean"]), tuple(float(v) for v in meta["pixel_std"]),
                       sha256_file(path), f"ONNX export of {meta.get('arch', '?')} (onnxruntime)", meta)
