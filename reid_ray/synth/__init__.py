"""The synthetic toy zoo: individuals told apart only by their own coat pattern.

``generate_zoo`` writes images, ``metadata.csv`` and ``split.csv``; ``sample_grid`` draws
a preview grid (rows = individuals, columns = images).
"""

from reid_ray.synth.zoo import ZooSummary, generate_zoo, sample_grid

__all__ = ["ZooSummary", "generate_zoo", "sample_grid"]
