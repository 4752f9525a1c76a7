"""The seeded fault run (tests/faults.py) with a bounded budget, as part of the suite.

KEVO_FAULT_SEED picks the seed (default: a random one, printed, and named in any failure so
the run can be replayed with `python tests/faults.py --seed N`); KEVO_FAULT_SECONDS the time
faults go on (default 40). A longer soak: `python tests/faults.py --seconds 600`.
"""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import pytest
from faults import RSS_BOUND_BYTES, Proxy, run


@pytest.mark.slow
def test_seeded_faults_lose_nothing_and_converge(tmp_path: Path) -> None:
    seed = int(os.environ.get("KEVO_FAULT_SEED") or random.randrange(2**32))
    seconds = float(os.environ.get("KEVO_FAULT_SECONDS") or 40)
    report = run(seed, seconds, tmp_path)
    text = "\n".join(report.lines())
    print(text)
    assert not report.problems, f"replay with: python tests/faults.py --seed {seed}\n{text}"
    assert report.faults and report.acked > 0
    assert all(0 < rss <= RSS_BOUND_BYTES for rss in report.peak_rss.values())


def test_the_proxy_passes_bytes_then_cuts_mid_message_and_resets() -> None:
    """The harness's own tool: bytes pass both ways; cut_after passes exactly that many
    downstream bytes then closes; reset makes the client see ECONNRESET."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        proxy = Proxy(int(server.getsockname()[1]))
        try:
            client = socket.create_connection(("127.0.0.1", proxy.port))
            upstream, _ = server.accept()
            client.sendall(b"ping")
            assert upstream.recv(4) == b"ping"
            proxy.cut_after = 3
            upstream.sendall(b"0123456789")
            assert _read_all(client) == b"012"  # then EOF: cut part way through
            client2 = socket.create_connection(("127.0.0.1", proxy.port))
            upstream2, _ = server.accept()
            time.sleep(0.1)
            proxy.cut(reset=True)
            with pytest.raises(ConnectionResetError):
                client2.sendall(b"x")
                time.sleep(0.1)
                client2.recv(1)
        finally:
            proxy.close()
            for s in (client, upstream, client2, upstream2):
                s.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    out = b""
    while chunk := sock.recv(100):
        out += chunk
    return out
