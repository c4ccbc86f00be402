"""The evaluate pipeline: embed + index + search + metrics on a split.

``evaluate`` (``protocol.py``) is callable from Python and behind ``reid-ray evaluate``;
pure metrics live in ``reid_ray.eval``, this package ties the stages together.
"""


def __getattr__(name: str):
    if name in ("evaluate", "score_ranking"):
        from reid_ray.evaluation import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'reid_ray.evaluation' has no attribute {name!r}")


__all__ = ["evaluate", "score_ranking"]
