"""Dataset reading, caption text normalisation and the vocabulary (images: captioner.data.images)."""
from captioner.data.datasets import (DatasetReadout, ImageRecord, PreparedData, load_prepared, prepare,
                                     read_dataset)
from captioner.data.text import normalize, tokenize
from captioner.data.vocab import Vocabulary

__all__ = ["DatasetReadout", "ImageRecord", "PreparedData", "Vocabulary", "load_prepared", "normalize",
           "prepare", "read_dataset", "tokenize"]
