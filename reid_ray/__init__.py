"""reid-ray: distributed animal re-identification on Ray.

Sub-packages, one per stage: ``data`` (manifests, images), ``synth`` (toy zoo),
``models`` (one loader for every model reference), ``embed``, ``index``, ``train``,
``rerank``, ``eval``. Nothing heavy is imported here.
"""

__version__ = "0.1.0"
