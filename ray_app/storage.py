"""Where files live: a local path (with ~) or any URI pyarrow opens (s3://, gs://), one rule for every store the
app writes (prediction log, feedback store)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from ray_app.errors import AppError

if TYPE_CHECKING:
    from ray.train import Checkpoint


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


@contextlib.contextmanager
def own_copy(checkpoint: Checkpoint) -> Iterator[Path]:
    """A Ray Train checkpoint's files in a directory only this process reads (the checkpoint's own directory when it
    is on a local or shared file system). Not `Checkpoint.as_directory()`: for remote storage it gives every process
    of a machine the same temp dir, and a process that gets there after another finished downloading downloads
    again into it, over files the first may still be reading (ray/train/_checkpoint.py, `to_directory`, Ray 2.60;
    ray-project/ray#48726, open). Seen as `PytorchStreamReader failed reading file` when two Train workers on one
    machine resumed from S3."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="rayapp-checkpoint-") as tmp:
        yield Path(checkpoint.to_directory(tmp))
