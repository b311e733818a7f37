"""Datasets: official-format readers, the synthetic benchmark, text processing, loaders."""
from tbps_lib.data.catalog import load_dataset
from tbps_lib.data.formats import DatasetError, Record, TBPSDataset

__all__ = ["DatasetError", "Record", "TBPSDataset", "load_dataset"]
