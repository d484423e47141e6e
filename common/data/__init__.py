"""Datasets: spec strings → image tables, image decoding, and the torch ``Dataset`` over them.

One module per concern (none of them imports torch except :mod:`~partreid.common.data.images`):

=================  ===========================================================================================
``specs``          :func:`load_dataset` (the entry point), spec parsing, ``$REID_DATA`` names, layout detection
``base``           :class:`ReIDDataset`, :func:`compute_fingerprint`, folder-listing helpers
``market``         Market-1501 and DukeMTMC-reID
``cuhk03``         CUHK03-NP (labeled / detected)
``msmt17``         MSMT17 V1 / V2 (list files)
``custom``         ``folder:`` and ``csv:`` datasets
``luperson``       LUPerson: image tree + cached file index (:class:`PathTable`), LMDB reader
``decode``         Pillow decoding (whole images; bounded uint8 arrays with JPEG DCT scaling)
``images``         :class:`~partreid.common.data.images.ImageDataset` (torch) and its collate helpers
=================  ===========================================================================================

``from partreid.common.data import load_dataset`` is the one import most callers need.
"""

from partreid.common.data.base import IMAGE_EXTENSIONS, KINDS, SPLITS, ReIDDataset, compute_fingerprint
from partreid.common.data.luperson import PathTable, load_file_index
from partreid.common.data.specs import detect_layout, load_dataset, resolve_data_name

__all__ = ["IMAGE_EXTENSIONS", "KINDS", "SPLITS", "PathTable", "ReIDDataset", "compute_fingerprint",
           "detect_layout", "load_dataset", "load_file_index", "resolve_data_name"]
