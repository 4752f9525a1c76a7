"""localnode.start_node, which the demo and the benchmarks use to run nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kevo_repl.localnode import NodeStartError, free_port, start_node


def test_a_node_that_exits_is_reported_with_its_exit_code(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(NodeStartError, match=r"exited with code 2"):  # not the 60 s timeout
        start_node(str(tmp_path), addr, "--sync-mode", "fast")
