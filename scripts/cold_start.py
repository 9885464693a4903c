"""Time a server's cold start: from launching its command to the first answered completion.

    .venv/bin/python scripts/cold_start.py --port 8000 -- .venv/bin/tokenforge serve --port 8000

The clock starts just before the command is launched; the script then polls `POST /v1/completions` (a
one-token greedy request) until one returns 200, prints the elapsed seconds and the resident memory of the
server's process tree at that moment (VmRSS summed over the process and its descendants), and stops the
server. Any OpenAI-compatible server works, so the same script times a peer such as vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--repeats", type=int, default=1, help="start the server this many times; the median is kept")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the server command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the server command after --")
    runs = [one_start(command, args) for _ in range(args.repeats)]
    times = sorted(t for t, _ in runs)
    rss = sorted(r for _, r in runs)
    print(json.dumps({"command": " ".join(command), "cold_start_s": [round(t, 2) for t in times],
                      "median_s": round(times[len(times) // 2], 2),
                      "rss_mib": [round(r / 2**20, 1) for r in rss],
                      "rss_median_mib": round(rss[len(rss) // 2] / 2**20, 1)}))
    return 0


def tree_rss(pid: int) -> int:
    """VmRSS of pid and every process below it, in bytes (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def one_start(command: list[str], args) -> tuple[float, int]:
    base = f"http://127.0.0.1:{args.port}"
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=30.0) as client:
            while time.perf_counter() - started < args.timeout:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with code {proc.returncode} before answering")
                try:
                    model = args.model or client.get(f"{base}/v1/models").json()["data"][0]["id"]
                    resp = client.post(f"{base}/v1/completions",
                                       json={"model": model, "prompt": "def", "max_tokens": 1, "temperature": 0})
                    if resp.status_code == 200:
                        return time.perf_counter() - started, tree_rss(proc.pid)
                except (httpx.TransportError, KeyError, ValueError):
                    pass  # not listening yet
                time.sleep(0.05)
        raise SystemExit(f"no answer within {args.timeout} s")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
