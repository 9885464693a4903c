"""Compare grammar engines for structured output on this machine: llguidance (the one tokenforge uses),
xgrammar and outlines-core. Not a test, not run by pytest: it measures.

For each tokenizer (a tokenizer.json; byte-level BPE) and engine it reports the tokenizer set-up time, then
per JSON schema the compile time and the mask time per token along a random valid output drawn through that
engine's own masks (same seed; the engines' JSON dialects differ slightly, so the outputs may too).

    .venv/bin/python scripts/compare_grammar_engines.py --tokenizer src/tokenforge/demo_model/tokenizer.json \\
        --tokenizer /tmp/bpe32000.json --tokenizer /tmp/bpe128000.json
    .venv/bin/python scripts/compare_grammar_engines.py --train-bpe 32000 --out /tmp/bpe32000.json

The other engines are optional: install them in a scratch environment (xgrammar pulls in its own
requirements), not in the project's. `--train-bpe` makes a byte-level BPE tokenizer of a real size from
the Python standard library's sources, since nothing is downloaded here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"], "additionalProperties": False},
    "enum-const": {"type": "object", "properties": {"kind": {"enum": ["a", "b", "c"]}, "v": {"const": 1}},
                   "required": ["kind", "v"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
              "minItems": 2, "maxItems": 6},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {
            "type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
            "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    "anyof": {"anyOf": [{"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
                         "additionalProperties": False}, {"type": "string", "maxLength": 10}]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                                 "required": ["x", "y"], "additionalProperties": False}},
             "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
             "required": ["a", "b"], "additionalProperties": False},
    "pattern-format": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "day": {"type": "string", "format": "date"}},
        "required": ["code", "day"], "additionalProperties": False},
    "wide": {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"]}
                                              for i in range(24)},
             "required": [f"field_{i}" for i in range(24)], "additionalProperties": False},
}
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def train_bpe(size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(sysconfig.get_paths()["stdlib"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((p.read_text(errors="ignore") for p in root.rglob("*.py")), trainer)
    tok.save(str(out))
    print(f"wrote {out}: {tok.get_vocab_size(True)} tokens")


def eos_id(tokenizer) -> int:
    for name in ("</s>", "<|endoftext|>", "<|eot_id|>", "<|im_end|>"):
        if tokenizer.token_to_id(name) is not None:
            return tokenizer.token_to_id(name)
    raise SystemExit("cannot find an EOS token in the tokenizer")


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int):
        import llguidance

        self.llg = llguidance
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.words = (vocab_size + 31) // 32

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def mask(self, matcher, out: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer_file: str, vocab_size: int, eos: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file)
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher, out: np.ndarray) -> None:
        import torch

        matcher.fill_next_token_bitmask(torch.from_numpy(out).view(1, -1), 0)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import outlines_core

        self.oc = outlines_core
        byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            if token_id != eos:
                tokens.setdefault(bytes(byte_of[ch] for ch in text), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r"[ ]?")
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def mask(self, guide, out: np.ndarray) -> None:
        guide.write_mask_into(out.ctypes.data, out.size, 4)

    def accept(self, guide, token: int) -> None:
        guide.advance(token)

    def done(self, guide) -> bool:
        return guide.is_finished()


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), rebuilt here."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def measure(engine, schema: dict, vocab_size: int, eos: int, rng: random.Random, max_tokens: int) -> dict:
    """Compile, then one random output through the engine's own masks (a uniform draw among the allowed
    tokens each step), timing each mask."""
    start = time.perf_counter()
    matcher = engine.compile(schema)
    compile_s = time.perf_counter() - start
    mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
    times = []
    for _ in range(max_tokens):
        start = time.perf_counter()
        engine.mask(matcher, mask)
        times.append(time.perf_counter() - start)
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].nonzero()[0]
        token = int(allowed[rng.randrange(len(allowed))])
        if token == eos:
            break
        engine.accept(matcher, token)
        if engine.done(matcher):
            break
    times.sort()
    return {"compile_ms": compile_s * 1e3, "mask_p50_us": statistics.median(times) * 1e6,
            "mask_p99_us": times[min(len(times) - 1, int(0.99 * len(times)))] * 1e6, "num_tokens": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json (repeatable)")
    parser.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per random output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-bpe", type=int, help="train a byte-level BPE tokenizer of this size and exit")
    parser.add_argument("--out", type=Path, help="where --train-bpe writes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.train_bpe:
        train_bpe(args.train_bpe, args.out or Path(f"bpe{args.train_bpe}.json"))
        return 0
    from tokenizers import Tokenizer

    results = []
    for path in args.tokenizer or ["src/tokenforge/demo_model/tokenizer.json"]:
        tokenizer = Tokenizer.from_file(path)
        vocab_size, eos = tokenizer.get_vocab_size(with_added_tokens=True), eos_id(tokenizer)
        for engine_name in args.engines.split(","):
            start = time.perf_counter()
            try:
                engine = make_engine(engine_name, path, tokenizer, vocab_size, eos)
            except ImportError as e:
                print(f"skipping {engine_name}: {e}", file=sys.stderr)
                continue
            setup_s = time.perf_counter() - start
            for name, schema in SCHEMAS.items():
                try:
                    row = measure(engine, schema, vocab_size, eos, random.Random(args.seed), args.max_tokens)
                except Exception as e:  # an engine that cannot take a schema is a result, not a crash
                    row = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                results.append({"vocab_size": vocab_size, "engine": engine_name, "setup_s": setup_s,
                                "schema": name, **row})
                print(json.dumps(results[-1]) if args.json else _line(results[-1]), flush=True)
    return 0


def make_engine(name: str, path: str, tokenizer, vocab_size: int, eos: int):
    if name == "llguidance":
        return Llguidance(tokenizer.to_str(), vocab_size, eos)
    if name == "xgrammar":
        return Xgrammar(path, vocab_size, eos)
    if name == "outlines-core":
        return OutlinesCore(tokenizer, vocab_size, eos)
    raise SystemExit(f"unknown engine {name!r}")


def _line(row: dict) -> str:
    head = f"vocab {row['vocab_size']:>6}  {row['engine']:<13} setup {row['setup_s']:6.2f} s  {row['schema']:<14}"
    if "error" in row:
        return f"{head} error: {row['error']}"
    return (f"{head} compile {row['compile_ms']:9.2f} ms  mask p50 {row['mask_p50_us']:8.1f} us  "
            f"p99 {row['mask_p99_us']:8.1f} us  ({row['num_tokens']} tokens)")


if __name__ == "__main__":
    sys.exit(main())
