"""How this app reads CSV, for the data stage and batch inference alike.

Two things both need and neither should own: the header from the first block only, so a missing column fails
before Ray reads a whole file; and lines that do not parse, reported to a tiny actor and skipped, so a stray quote
is a counted bad row, not a crashed job. A leaf: it imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
from pyarrow import csv as pacsv

from ray_app.errors import AppError

SNIPPET = 200  # characters of an unparseable line that are kept


def parse_options(invalid_row_handler: Callable[[Any], str] | None = None) -> pacsv.ParseOptions:
    """The dialect both stages read: quoted values may span lines (descriptions do)."""
    return pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid_row_handler)


def header(path: str) -> list[str]:
    """Column names from the first block only (a path or a URI pyarrow's filesystems open)."""
    from pyarrow import fs

    filesystem, inner = fs.FileSystem.from_uri(path) if "://" in path else (fs.LocalFileSystem(), path)
    try:
        with filesystem.open_input_stream(inner) as stream:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=1 << 16),
                parse_options=parse_options(lambda _: "skip"),
            )
            return reader.schema.names
    except (OSError, pa.ArrowInvalid) as exc:
        raise AppError(f"data file {path} could not be parsed as CSV: {str(exc).splitlines()[0]}") from None


class MalformedCounter:
    """A tiny actor the CSV readers report unparseable lines to, so they are counted instead of crashing."""

    def __init__(self) -> None:
        self.lines: dict[tuple[int | None, str], None] = {}

    def add(self, number: int | None, text: str) -> None:
        self.lines[(number, text)] = None  # keyed: Ray may read a block twice (schema, then data)

    def get(self) -> list[str]:
        return [text for _, text in self.lines]


def count_malformed(chars: int = SNIPPET) -> tuple[Any, Callable[[Any], str]]:
    """A `MalformedCounter` actor (no CPU reserved) and the `invalid_row_handler` that reports each bad line to it
    (its first `chars` characters) and skips the line. Read the lines back with `malformed_lines`."""
    import ray

    counter = ray.remote(num_cpus=0)(MalformedCounter).remote()

    def skip(row: Any) -> str:
        # Wait for the actor: a fire-and-forget call could still be in flight when the driver asks for the count.
        ray.get(counter.add.remote(row.number, str(row.text)[:chars]))
        return "skip"

    return counter, skip


def malformed_lines(counter: Any) -> list[str]:
    """The lines `counter` was told about, in the order first seen; the actor is then stopped."""
    import ray

    lines = ray.get(counter.get.remote())
    ray.kill(counter)
    return lines
