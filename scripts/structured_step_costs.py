"""What structured output adds to one decode step, measured without a model: the bitmask worker's mask time
per token (p50/p99) for a batch of constrained requests, the logits-processing step that applies the masks,
and how much of the mask work hides behind a stand-in forward pass (a float32 matmul of about the size of
a small model's step). Not a test, not run by pytest.

    .venv/bin/python scripts/structured_step_costs.py --tokenizer src/tokenforge/demo_model/tokenizer.json \\
        --batch 1 --batch 16 --steps 200 [--json]

Each request walks its schema at random through the applied masks (a uniform draw among allowed tokens),
so the masks are those of real outputs; a request that finishes starts again.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from tokenizers import Tokenizer

from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.logits import RowConstraints, apply_constraints
from tokenforge.structured.params import StructuredOutputsParams
from tokenforge.structured.worker import BitmaskWorker, MaskJob

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}, "tag": {
        "enum": ["a", "b", "c"]}}, "required": ["x", "tag"], "additionalProperties": False}, "maxItems": 5},
    {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                     "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"k": {"const": "v"}, "n": {"type": "integer"}},
                "required": ["k", "n"], "additionalProperties": False}, {"type": "string", "maxLength": 30}]},
]


def eos_id(tokenizer: Tokenizer) -> int:
    for name in ("</s>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>"):
        if tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    raise SystemExit("cannot find an EOS token in the tokenizer")


def run(compiler: GrammarCompiler, batch: int, steps: int, forward: torch.Tensor, seed: int) -> dict:
    rng = random.Random(seed)
    specs = [StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]) for i in range(batch)]
    matchers = [compiler.matcher(s) for s in specs]
    worker = BitmaskWorker(compiler.vocab_size, batch)
    rows = [RowConstraints(bitmask_row=i) for i in range(batch)]
    plain, overlapped, exposed, apply_s = [], [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        _ = forward @ forward  # the forward pass alone
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        handle = worker.submit([MaskJob(m, i) for i, m in enumerate(matchers)])
        _ = forward @ forward  # the same pass, masks computed meanwhile
        waited = time.perf_counter()
        result = handle.wait()
        overlapped.append(time.perf_counter() - start)
        exposed.append(time.perf_counter() - waited)
        logits = torch.randn(batch, compiler.vocab_size)
        start = time.perf_counter()
        apply_constraints(logits, rows, result.bitmask)
        apply_s.append(time.perf_counter() - start)
        for i, row in enumerate(logits):
            allowed = torch.isfinite(row).nonzero().squeeze(1).tolist()
            token = allowed[rng.randrange(len(allowed))]
            if token in compiler.eos_token_ids or not matchers[i].accept_tokens([token]) \
                    or matchers[i].is_terminated:
                matchers[i] = compiler.matcher(specs[i])  # this output is done: start another
    pct = worker.mask_time_percentiles((50, 99))
    worker.close()
    return {"vocab_size": compiler.vocab_size, "batch": batch, "steps": steps,
            "mask_p50_us": pct[50] * 1e6, "mask_p99_us": pct[99] * 1e6,
            "apply_p50_ms": statistics.median(apply_s) * 1e3,
            "forward_p50_ms": statistics.median(plain) * 1e3,
            "forward_with_masks_p50_ms": statistics.median(overlapped) * 1e3,
            "exposed_mask_wait_p50_ms": statistics.median(exposed) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json (repeatable)")
    parser.add_argument("--batch", type=int, action="append", default=[], help="requests per step (repeatable)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--forward-size", type=int, default=768, help="the stand-in matmul's side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the stand-in forward pass")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    forward = torch.randn(args.forward_size, args.forward_size)
    for path in args.tokenizer or ["src/tokenforge/demo_model/tokenizer.json"]:
        tokenizer = Tokenizer.from_file(path)
        compiler = GrammarCompiler(tokenizer, tokenizer.get_vocab_size(with_added_tokens=True), [eos_id(tokenizer)])
        for batch in args.batch or [1, 16]:
            row = run(compiler, batch, args.steps, forward, seed=0)
            print(json.dumps(row) if args.json else "  ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        compiler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
