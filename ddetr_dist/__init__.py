"""ddetr_dist: distributed training of Deformable DETR (arXiv 2010.04159)."""

__version__ = "0.1.0"
