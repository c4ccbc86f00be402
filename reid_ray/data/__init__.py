"""Manifests and images: reading, validating, decoding (local paths and s3://)."""

from reid_ray.data.images import crop_bbox, decode_image, load_image, resize_image
from reid_ray.data.manifest import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    Manifest,
    empty_errors,
    errors_table,
    parse_bbox,
    read_manifest,
    validate_manifest,
)

__all__ = [
    "ERRORS_SCHEMA",
    "MANIFEST_SCHEMA",
    "Manifest",
    "crop_bbox",
    "decode_image",
    "empty_errors",
    "errors_table",
    "load_image",
    "parse_bbox",
    "read_manifest",
    "resize_image",
    "validate_manifest",
]
