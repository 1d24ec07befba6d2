"""h5ad -> vcc-dist corpus conversion and validation (docs/design.md §3)."""

from .convert import ConvertConfig, convert_corpus
from .source import ConversionError, ConversionWarning, CorruptInputError
from .validate import ValidationReport, validate_corpus

__all__ = ["ConvertConfig", "convert_corpus", "ConversionError", "ConversionWarning",
           "CorruptInputError", "validate_corpus", "ValidationReport"]
