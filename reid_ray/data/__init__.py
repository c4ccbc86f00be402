"""Manifests, split files and images: reading, validating, decoding (local paths and s3://);
a manifest from a folder of images (``folders``)."""

from reid_ray.data.folders import scan_folder, write_folder_manifest
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
from reid_ray.data.splits import SPLIT_KINDS, SPLIT_NAMES, make_split, read_split, write_split

__all__ = [
    "ERRORS_SCHEMA",
    "MANIFEST_SCHEMA",
    "SPLIT_KINDS",
    "SPLIT_NAMES",
    "Manifest",
    "crop_bbox",
    "decode_image",
    "empty_errors",
    "errors_table",
    "load_image",
    "make_split",
    "parse_bbox",
    "read_manifest",
    "read_split",
    "resize_image",
    "scan_folder",
    "validate_manifest",
    "write_folder_manifest",
    "write_split",
]
