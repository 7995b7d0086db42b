"""The prediction log: every prediction appended, off the request path, in batches to Parquet files that
`ray.data.read_parquet` (and the monitoring stage) reads back.

Each ingress replica buffers rows and writes its own files, so replicas never contend for one file.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_app.serve.settings import PredictionLogSettings

log = logging.getLogger("ray.serve")
SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),  # the caller's X-Request-Id (or Serve's): a reuse is the caller's to explain
        ("served_id", pa.string()),  # unique per request served (its shadow row shares it): the log's own key
        ("item", pa.int32()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("route", pa.string()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("status", pa.int16()),
        ("error", pa.string()),
        ("text", pa.string()),
        ("text_sha256", pa.string()),
        ("text_chars", pa.int32()),
        ("text_words", pa.int32()),
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("probabilities", pa.string()),
        ("latency_ms", pa.float32()),
    ]
)
PREFIX = "predictions-"


def with_served_key(frame):
    """`served_id` on every row of a log frame: the log's own key per request; rows written before it existed use
    their request id. Readers on both sides (canary report, feedback) join and count by it."""
    import pandas as pd

    key = frame["served_id"] if "served_id" in frame.columns else pd.Series(None, index=frame.index, dtype=object)
    return frame.assign(served_id=key.fillna(frame["request_id"]))


def text_fields(text: str, store_text: bool) -> dict[str, Any]:
    """Length descriptors are kept even when the text is not, so drift on length works in hashed mode too."""
    return {
        "text": text if store_text else None,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "text_chars": len(text),
        "text_words": len(text.split()),
    }


@dataclass
class PredictionLog:
    settings: PredictionLogSettings
    writer_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    rows: list[dict[str, Any]] = field(default_factory=list)
    first_row_at: float | None = None
    files_written: int = 0

    def __post_init__(self) -> None:
        self.fs, self.root = None, ""
        if self.settings.uri:
            self.fs, self.root = pafs.FileSystem.from_uri(self._as_uri(self.settings.uri))
            self.fs.create_dir(self.root, recursive=True)

    @staticmethod
    def _as_uri(uri: str) -> str:
        return uri if "://" in uri else "file://" + str(Path(uri).expanduser().resolve())

    @property
    def enabled(self) -> bool:
        return self.fs is not None

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if not self.rows:
            self.first_row_at = time.monotonic()
        self.rows.extend(rows)

    def due(self) -> bool:
        if not self.rows:
            return False
        waited = time.monotonic() - (self.first_row_at or 0)
        return len(self.rows) >= self.settings.flush_rows or waited >= self.settings.flush_interval_s

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows, self.first_row_at = self.rows, [], None
        return rows

    def write(self, rows: list[dict[str, Any]]) -> str | None:
        """Blocking: run it in a thread. Writes to a temp name and renames, so readers never see half a file."""
        if not rows or not self.enabled:
            return None
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{self.writer_id}-{self.files_written:06d}"
        final = f"{self.root}/{name}.parquet"
        tmp = f"{self.root}/.{name}.tmp"
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, final)
        self.files_written += 1
        self.enforce_retention()
        return final

    def enforce_retention(self) -> list[str]:
        """Delete files past the age limit, then the oldest ones past the size limit."""
        infos = [
            i
            for i in self.fs.get_file_info(pafs.FileSelector(self.root))
            if i.type == pafs.FileType.File and i.base_name.startswith(PREFIX)
        ]
        infos.sort(key=lambda i: i.base_name)  # names start with the UTC time they were written
        doomed = []
        if self.settings.retention_days is not None:
            cutoff = time.time() - self.settings.retention_days * 86400
            doomed = [i for i in infos if i.mtime is not None and i.mtime.timestamp() < cutoff]
        kept = [i for i in infos if i not in doomed]
        if self.settings.max_bytes is not None:
            total = sum(i.size for i in kept)
            while kept and total > self.settings.max_bytes:
                oldest = kept.pop(0)
                total -= oldest.size
                doomed.append(oldest)
        for info in doomed:
            self.fs.delete_file(info.path)
        if doomed:
            log.info("prediction log retention removed %d file(s)", len(doomed))
        return [i.path for i in doomed]
