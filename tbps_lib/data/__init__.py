"""Datasets: official-format readers, the synthetic benchmark, text processing, loaders."""
from tbps_lib.data.formats import DatasetError, Record, TBPSDataset, load_dataset

__all__ = ["DatasetError", "Record", "TBPSDataset", "load_dataset"]
