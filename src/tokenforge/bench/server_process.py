"""A server the benchmark starts, restarts and stops itself (`bench serve --server-cmd CMD`): started as a
subprocess, ready once `/health` answers 200, stopped with SIGTERM (a tokenforge server then drains its
requests and flushes its KV tiers) and killed only if it does not exit in time. Its output goes to a log
file in the temporary folder, named when it starts and in every error."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 120.0


class ServerProcess:
    def __init__(self, cmd: str, base_url: str):
        self.argv = shlex.split(cmd)
        self.health = base_url.rstrip("/") + "/health"
        self.log = Path(tempfile.gettempdir()) / f"tokenforge-bench-server-{int(time.time())}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        print(f"bench: starting {' '.join(self.argv)} (output in {self.log})", file=sys.stderr, flush=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode} before it was ready; "
                                 f"see {self.log}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def server_running(cmd: str | None, base_url: str) -> Iterator[None]:
    """The server that `cmd` starts, up for the duration of the block; nothing when `cmd` is None."""
    if cmd is None:
        yield
        return
    server = ServerProcess(cmd, base_url)
    server.start()
    try:
        yield
    finally:
        server.stop()
