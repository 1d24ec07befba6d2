"""vcc-dist: Ray-distributed training and challenge-exact evaluation of virtual cell models
(design: docs/design.md)."""

__version__ = "0.1.0"
