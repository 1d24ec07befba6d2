"""Validate a corpus against its manifest and sources. `python jobs/validate_corpus.py --help`."""

import sys

import _bootstrap  # noqa: F401

from data_conversion.cli import validate_main

if __name__ == "__main__":
    sys.exit(validate_main())
