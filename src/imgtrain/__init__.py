"""imgtrain: distributed, fault-tolerant image-classification training on PyTorch."""

__version__ = "0.1.0"
