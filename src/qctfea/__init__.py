"""qctfea: longitudinal QCT finite element analysis of vertebrae with pedicle screws."""

__version__ = "0.1.0"
