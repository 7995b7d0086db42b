"""Where files live: a local path (with ~) or any URI pyarrow opens (s3://, gs://), one rule for every store the
app writes (prediction log, feedback store)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from ray_app.errors import AppError


def as_uri(uri: str) -> str:
    """A URI as given; a local path as an absolute file:// URI."""
    return uri if "://" in uri else "file://" + str(Path(uri).expanduser().resolve())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A local path (with ~) or any pyarrow filesystem URI (s3://, gs://) -> (filesystem, path inside it)."""
    try:
        return pafs.FileSystem.from_uri(as_uri(uri))
    except (OSError, ValueError) as exc:
        raise AppError(f"{uri} is not a path or filesystem URI pyarrow can open: {exc}") from None


def checkpoint_uri(path: str, storage_path: str) -> str:
    """A checkpoint's path as a URI that opens again in another process (`ray.train.Checkpoint(uri)`, pyarrow): Ray
    gives the path inside its filesystem (`bucket/run/checkpoint_...` for S3, also in what Tune reports), which
    alone reads as a local path. `storage_path` is where the run was stored (train.storage_path)."""
    scheme = storage_path.split("://", 1)[0] if "://" in storage_path else ""
    return f"{scheme}://{path}" if scheme and scheme != "file" and "://" not in path else path
