"""Which rows of a dataset a stage works on: the one rule for choosing a split.

``extract-features``, ``pass-pretrain`` and ``finetune`` all take their rows through :func:`choose_split`, so a
dataset without a ``train`` split is handled the same way everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Tuple

from partreid.common.errors import InputError

if TYPE_CHECKING:  # the frames come from the dataset; this module needs no pandas of its own
    import pandas as pd


def choose_split(ds, split: Optional[str] = None, *, unlabelled: bool = False) -> Tuple[str, "pd.DataFrame"]:
    """The rows of ``split`` in dataset ``ds``.

    Args:
        ds: a dataset (``partreid.common.data.ReIDDataset``): ``ds.frame`` has a ``split`` column
            and ``ds.spec`` names it in messages.
        split: a split name, ``'all'`` (every row), or None/'' for the default: ``train`` when the dataset has
            one, else its only split.
        unlabelled: for self-supervised use (``pass-pretrain``): when the default cannot be chosen (several
            splits, none called ``train``) take every row instead of raising.

    Returns:
        ``(split name, rows)`` with the rows as a pandas DataFrame (columns path, pid, camid, split, ...)
        indexed 0..n-1.

    Raises:
        InputError: the split does not exist, or no default can be chosen.
    """
    splits = list(dict.fromkeys(ds.frame["split"]))
    if split in (None, ""):
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        elif unlabelled:
            split = "all"
        else:
            raise InputError(f"{ds.spec}: choose a split with --split ({', '.join(splits)})")
    if split == "all":
        return split, ds.frame.reset_index(drop=True)
    if split not in splits:
        raise InputError(f"{ds.spec}: no split {split!r} (available: {', '.join(splits) or 'none'})")
    return split, ds.frame[ds.frame["split"] == split].reset_index(drop=True)
