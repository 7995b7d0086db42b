"""A load generator light enough to share 2 cores with the server it measures: raw HTTP/1.1 over keep-alive
connections on uvloop, requests serialized once, responses parsed only for their status and length.

Why not httpx here: at 3x the app's capacity (about 350 req/s) an httpx AsyncClient took 96 % of a core, so half
the machine went to the client and its own event loop delayed what it measured (bench/README.md has the numbers).
This one keeps to its schedule (the open loop reports how late its sends were) at a fraction of that.

    statuses = run(open_loop("127.0.0.1", 8000, "/predict", rate=300, seconds=10, body=lambda i: b'{"title": "x"}'))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

ByStatus = dict[int, list[float]]  # status -> latencies in ms (599: no answer: refused, reset or timed out)
NO_ANSWER = 599


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run` on uvloop (Ray ships it), the cheaper event loop."""
    import uvloop

    return uvloop.run(coro)


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


async def _response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, keep the connection); the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    fields = {}
    for line in rest.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip().lower()
    if fields.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(fields.get(b"content-length", b"0")))
    return status, fields.get(b"connection") != b"close"


class _Pool:
    """Idle keep-alive connections to one server; a request takes one or opens a new one."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, payload: bytes, timeout_s: float) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            writer.write(payload)
            status, keep = await asyncio.wait_for(_response(reader), timeout_s)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError):
            writer.close()
            return NO_ANSWER
        if keep:
            self.idle.append(conn)
        else:
            writer.close()
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def open_loop(
    host: str,
    port: int,
    path: str,
    rate: float,
    seconds: float,
    body: Callable[[int], bytes],
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> tuple[ByStatus, float]:
    """Requests on a fixed schedule, whatever the replies; latency from each request's actual send. Returns the
    latencies by status and the p99 of how late sends left against the schedule (ms): a generator that cannot keep
    its schedule is measuring itself."""
    pool, by_status, late = _Pool(host, port), {}, []
    payloads = [request_bytes(host, port, path, body(i), headers) for i in range(int(rate * seconds))]

    async def one(payload: bytes) -> None:
        sent = time.perf_counter()
        status = await pool.send(payload, timeout_s)
        by_status.setdefault(status, []).append((time.perf_counter() - sent) * 1000)

    tasks, start = [], time.perf_counter()
    for i, payload in enumerate(payloads):
        due = start + i / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        late.append(max(0.0, time.perf_counter() - due) * 1000)
        tasks.append(asyncio.ensure_future(one(payload)))
    await asyncio.gather(*tasks)
    pool.close()
    late.sort()
    return by_status, late[int(0.99 * (len(late) - 1))] if late else 0.0


async def closed_loop(
    host: str, port: int, path: str, clients: int, seconds: float, body: Callable[[int], bytes], headers=None
) -> tuple[ByStatus, float]:
    """`clients` callers, each sending its next request when the last is answered; (latencies by status, wall s)."""
    by_status: ByStatus = {}
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        pool = _Pool(host, port)
        while time.perf_counter() < deadline:
            payload = request_bytes(host, port, path, body(next(counter)), headers)
            sent = time.perf_counter()
            status = await pool.send(payload, 60.0)
            by_status.setdefault(status, []).append((time.perf_counter() - sent) * 1000)
        pool.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return by_status, time.perf_counter() - start
