"""rise-edge: domain-robust compact classifiers distilled from CLIP (RISE), exported and benchmarked for the edge."""

__version__ = "0.1.0"
