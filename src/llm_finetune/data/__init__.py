"""The data step: files -> validated records -> token ids with label masks -> batches."""

from .records import DataError, Example, load_examples, read_examples
from .tokenize import IGNORE_INDEX, ChatEncoder, Encoded, Skipped, TemplateError, encode_all

__all__ = [
    "DataError", "Example", "load_examples", "read_examples",
    "IGNORE_INDEX", "ChatEncoder", "Encoded", "Skipped", "TemplateError", "encode_all",
]
