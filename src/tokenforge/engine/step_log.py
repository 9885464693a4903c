"""`--step-log DIR`: each engine step's shape and time, one JSON line per step in DIR/steps-PID.jsonl.

The replica simulator (`tokenforge bench simulate --fit-from DIR`) fits its step cost from these lines, so
a cost model can come from the replicas of a real serving run, with everything that shares their cores
(the HTTP server, Ray, the other replicas, the load generator) in the times, rather than from an engine
timed alone. A line: start (wall-clock seconds), s (the step's own seconds), the step's shape as the cost
model counts it (prefill tokens, decoding requests, the context tokens those attend to, prefill attention
pairs) and busy (whether work was left after it: the next line's start then ends this step's cycle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenforge.engine.messages import SchedulerOutput


def step_shape(sched: SchedulerOutput) -> tuple[int, int, int, int]:
    """(prefill tokens, decoding requests, their context tokens, prefill attention pairs) of a step."""
    prefill = decodes = context = pairs = 0
    for r in sched.requests:
        n = r.num_new_tokens
        if n > 1:
            prefill += n
            pairs += n * (r.num_computed_tokens + n // 2)
        else:
            decodes += 1
            context += r.num_computed_tokens + 1
    return prefill, decodes, context, pairs


class StepLog:
    def __init__(self, folder: str):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = Path(folder) / f"steps-{os.getpid()}.jsonl"
        # line-buffered: a replica killed mid-run keeps the steps it took (a write per step costs microseconds)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the engine's life

    def record(self, sched: SchedulerOutput, start: float, seconds: float, busy: bool) -> None:
        prefill, decodes, context, pairs = step_shape(sched)
        self._file.write(json.dumps({"start": round(start, 6), "s": round(seconds, 6), "prefill": prefill,
                                     "decodes": decodes, "context": context, "pairs": pairs, "busy": busy}) + "\n")

    def close(self) -> None:
        self._file.close()
