"""edge-qmul: machine unlearning for int8 models deployed on edge devices."""

__version__ = "0.1.0"
