"""Evaluation: retrieval (mAP, CMC), open-set (BAKS/BAUS), cluster metrics, and splits.

Pure functions over numpy and pandas; nothing heavy is imported here.
"""

from reid_ray.eval.splits import SPLIT_NAMES, make_split, read_split, write_split

__all__ = ["SPLIT_NAMES", "make_split", "read_split", "write_split"]
