"""Node 0 of a two-node launch whose peer never comes: Ctrl-C stops it at once, not after the rendezvous timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import REPO, free_port


def listening(pid: int, port: int) -> bool:
    import psutil

    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def test_ctrl_c_stops_node_0_while_it_waits_for_the_other_nodes(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_app", "train", "tiny", "--runs-dir", str(tmp_path),
                             "--set", "train.grad_accum=2", "--nodes", "2", "--master-addr", "127.0.0.1",
                             "--master-port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=os.environ, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not listening(proc.pid, port):  # node 0's store is up: it waits for node 1 inside TCPStore
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "node 0 never started waiting for the other nodes"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
        _, stderr = proc.communicate(timeout=60)  # torch's own wait would last 600 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == "error: interrupted before any rank started (torchrun was waiting for every node to join)"
