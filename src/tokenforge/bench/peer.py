"""Running the throughput workload through a peer engine (vLLM's CPU build) in another Python.

The peer lives in its own environment, so it runs as a subprocess of that environment's Python
(`vllm_worker.py`). Any failure -- missing interpreter, import error, unsupported CPU, timeout -- comes
back as a `PeerResult` with an error and the path of the full log, never as an exception, so the
tokenforge and reference figures are still reported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenforge.bench.vllm_worker import RESULT_KEY
from tokenforge.bench.workload import Workload

WORKER = Path(__file__).with_name("vllm_worker.py")
SUPPORTED_PEERS = ("vllm",)


@dataclass(frozen=True)
class PeerResult:
    name: str
    tok_s: float | None = None
    elapsed_s: float | None = None
    version: str | None = None
    error: str | None = None  # one line for the report; the whole output is in `log_path`
    log_path: str | None = None


def new_log_path() -> str:
    """A fresh file for the peer's output; it fills while the peer runs, so `tail -f` shows its start-up."""
    fd, path = tempfile.mkstemp(prefix="tokenforge-bench-vllm-", suffix=".log")
    os.close(fd)
    return path


def _last_error_line(log: str) -> str:
    """The exception line of a traceback is the last non-blank line; that is what a user acts on."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _parse_result(output: str) -> dict | None:
    """The worker's result is its last JSON line; vLLM's own log lines share the stream."""
    for line in reversed(output.splitlines()):
        if line.startswith("{") and RESULT_KEY in line:
            return json.loads(line)
    return None


def _run_logged(cmd: list[str], log_path: str, timeout_s: float) -> int:
    """Run `cmd` with stdout and stderr going to `log_path` as they come; returns the exit code.

    The peer starts its own worker processes, so it runs in a session of its own and the whole group
    is killed if it overruns or the benchmark is interrupted; no stray vLLM process is left behind.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_vllm(peer_python: str, model_path: str, dtype: str, threads: int, workload: Workload,
             max_model_len: int, timeout_s: float, log_path: str) -> PeerResult:
    """Run `workload` through vLLM under `peer_python`; start-up is not timed, `generate` is."""
    spec = {"model": str(Path(model_path).resolve()), "dtype": dtype, "max_model_len": max_model_len,
            "threads": threads, "seed": workload.seed, "prompt_token_ids": workload.prompt_token_ids,
            "output_lens": workload.output_lens}
    with tempfile.NamedTemporaryFile("w", prefix="tokenforge-bench-spec-", suffix=".json") as spec_file:
        json.dump(spec, spec_file)
        spec_file.flush()
        # -I keeps the worker's own folder (this package) off sys.path: its modules must not shadow vLLM's.
        cmd = [peer_python, "-I", str(WORKER), spec_file.name]
        try:
            returncode = _run_logged(cmd, log_path, timeout_s)
        except OSError as e:
            return PeerResult("vllm", error=f"cannot run peer python {peer_python!r}: {e}", log_path=log_path)
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s (--peer-timeout)"
            return PeerResult("vllm", error=error, log_path=log_path)
    with open(log_path) as log:
        output = log.read()
    result = _parse_result(output) if returncode == 0 else None
    if result is None:
        error = f"exit code {returncode}: {_last_error_line(output)}"
        return PeerResult("vllm", error=error, log_path=log_path)
    return PeerResult("vllm", tok_s=result[RESULT_KEY], elapsed_s=result["elapsed_s"],
                      version=result.get("version"), log_path=log_path)
