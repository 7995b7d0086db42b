"""ray_app/cluster.py's logic that needs no cluster: how a node's loss is timed. The drills (tests/test_cluster.py,
as root) count a failed request as in flight when it was sent before every process of the node was dead, so that
moment must come from the processes themselves."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from ray_app.cluster import WorkerNode, _dead, kill_node, node_pids, sigkill

# A process that names the node's temp dir (as Ray's raylet does) and has a child that does not (as Ray's renamed
# workers do not): kill_node must find both, the child through its parentage.
PARENT = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"


def _started(node: WorkerNode, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while len(pids := node_pids(node)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def test_kill_node_kills_every_process_of_the_node_and_times_the_last_death(tmp_path: Path) -> None:
    node = WorkerNode(ip="127.0.0.9", temp_dir=str(tmp_path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path.resolve())])
    try:
        pids = _started(node, 2)
        assert parent.pid in pids and len(pids) == 2, pids
        before = time.monotonic()
        kill = kill_node(node)
        # Not reaped yet: this test is the parent, so the node's main process is a zombie, which counts as dead.
        assert kill.processes == 2 and before <= kill.signalled_at <= kill.gone_at, kill
        assert all(_dead(pid) for pid in pids) and node_pids(node) == []
        assert parent.wait(5) == -9  # SIGKILL, nothing asked to shut down
    finally:
        parent.kill()
        parent.wait(5)


def test_a_live_process_is_not_dead_and_a_missing_one_is() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert not _dead(child.pid)
    finally:
        child.kill()
        child.wait(5)
    assert _dead(child.pid)  # reaped: no /proc entry any more


# A server as a replica is one: threads, memory to tear down (512 MB written), a listening socket. Its main thread
# turns zombie at once on SIGKILL; the socket accepts until the last thread has exited.
SERVER = """
import socket, sys, threading, time
ballast = b"x" * (512 << 20)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
for _ in range(8):
    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print(server.getsockname()[1], flush=True)
time.sleep(600)
"""


def test_a_multithreaded_server_is_dead_only_once_its_socket_is_closed() -> None:
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening
        killed = sigkill([server.pid])
        assert killed.processes == 1 and killed.signalled_at <= killed.gone_at
        probe = socket.socket()
        try:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "accepted a connection after sigkill returned"
        finally:
            probe.close()
    finally:
        server.kill()
        server.wait(5)
