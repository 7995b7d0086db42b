"""The prediction log's writer: every prediction appended, off the request path, in batches to Parquet files that
`ray_app.prediction_log.read_log` (Ray Data) reads back; the schema and the readers live there.

Each ingress replica buffers rows and writes its own files, so replicas never contend for one file.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_app.prediction_log import PREFIX, SCHEMA
from ray_app.serve.settings import PredictionLogSettings
from ray_app.storage import as_uri

log = logging.getLogger("ray.serve")


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
            self.fs, self.root = pafs.FileSystem.from_uri(as_uri(self.settings.uri))
            self.fs.create_dir(self.root, recursive=True)

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
