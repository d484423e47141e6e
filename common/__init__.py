"""PartReID shared core: datasets, the HDF5 stage contract, models, search, evaluation."""

__version__ = "0.1.0"
