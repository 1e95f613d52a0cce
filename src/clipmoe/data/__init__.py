"""Image-caption data: readers for real formats, batch collation, and the generated attribute world."""

from .collate import ClipCollator
from .readers import DataError, ImageTextDataset, Record, Sample, SkipLog, open_dataset

__all__ = ["ClipCollator", "DataError", "ImageTextDataset", "Record", "Sample", "SkipLog", "open_dataset"]
