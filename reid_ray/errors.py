"""A small error hierarchy: every user-facing failure is a ``ReidRayError``.

The CLI turns these into one clear message and a non-zero exit; anything else is a bug.
"""


class ReidRayError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(ReidRayError):
    """An invalid argument or configuration value."""


class ManifestError(ReidRayError):
    """A manifest that cannot be used at all (missing, empty, required column absent)."""


class ModelError(ReidRayError):
    """A model reference that cannot be resolved or loaded."""


class ImageError(ReidRayError):
    """One image that cannot be used; batch jobs record it in the errors table."""


class OutputError(ReidRayError):
    """An output location that cannot be written or holds incompatible results."""


class StorageError(ReidRayError):
    """A path or object store that cannot be read or written (missing, no credentials)."""


#: what every S3 message ends with: the settings a user can change
S3_SETTINGS_HINT = (
    "S3 settings come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for a server "
    "other than AWS (MinIO, Ceph), AWS_ENDPOINT_URL"
)

#: S3 error codes a user fixes with credentials, and those that mean "no such place"
_S3_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
    "RequestTimeTooSkewed",
}
_S3_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404"}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it: ``__cause__``/``__context__`` and the
    ``cause`` a Ray task error carries from the worker."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or any(item is s for s in seen) or len(seen) > 50:
            continue
        seen.append(item)
        todo.extend([getattr(item, "cause", None), item.__cause__, item.__context__])
    return [e for e in seen if isinstance(e, BaseException)]


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.") or "RayTaskError" in type(exc).__name__


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "") or None
    return None


def _where(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f": {name}" if name else ""


def user_message(exc: BaseException) -> str | None:
    """One line saying what went wrong and what to do, for a failure the user can fix
    (their arguments, files, folders or object-store settings); None for anything else
    (a bug: its traceback stays).

    Looks through the whole chain, including the original error inside a Ray task error,
    so a missing bucket found by a Ray Data worker reads the same as one found here.
    """
    chain = _chain(exc)
    for item in chain:  # our own message first, unwrapped from any Ray task error
        if isinstance(item, ReidRayError) and not _is_ray_wrapper(item):
            return str(item).strip().splitlines()[0] if str(item).strip() else type(item).__name__
    names = {type(e).__name__ for e in chain}
    if any(isinstance(e, ModuleNotFoundError) and e.name == "faiss" for e in chain):
        return (
            "FAISS is not installed: install reid-ray with one FAISS extra, "
            "pip install -c constraints.txt -e '.[cpu]' (or '.[gpu]' on a GPU node; never both)"
        )
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return f"no S3 credentials found. {S3_SETTINGS_HINT}."
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"}:
        import os

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return (
            f"cannot reach the S3 server ({endpoint or 'AWS, no AWS_ENDPOINT_URL set'}): "
            f"check AWS_ENDPOINT_URL and the network. {S3_SETTINGS_HINT}."
        )
    codes = {c for c in map(_s3_code, chain) if c}
    top = next((e for e in chain if isinstance(e, OSError)), None)
    where = _where(top) if top is not None else ""
    if codes & _S3_CREDENTIAL_CODES:
        code = sorted(codes & _S3_CREDENTIAL_CODES)[0]
        return f"S3 refused the credentials ({code}){where}. {S3_SETTINGS_HINT}."
    if "NoSuchBucket" in codes:
        return f"S3 bucket not found{where}: create it, or check the s3:// path."
    if codes & {"AccessDenied", "403"}:
        return f"S3 access denied{where}: check the bucket policy. {S3_SETTINGS_HINT}."
    for item in chain:
        if isinstance(item, IsADirectoryError):
            return (
                f"expected a file, found a folder{_where(item)} (for a folder of images, "
                "make a manifest first: reid-ray manifest --images DIR --out DIR/manifest.csv)"
            )
        if isinstance(item, NotADirectoryError):
            return f"expected a folder, found a file{_where(item)}"
        if isinstance(item, FileNotFoundError):
            return f"not found{_where(item) or ': ' + str(item)}"
        if isinstance(item, PermissionError):
            return f"permission denied{_where(item) or ': ' + str(item)}"
    return None
