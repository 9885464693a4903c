"""The tokenizer a GGUF file describes (`tokenizer.ggml.*`), rebuilt as a `tokenizers.Tokenizer`.

Two vocabulary kinds are in common use:
- `gpt2`: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet and come with ranked merges; the
  text is first split by the pre-tokenizer named in `tokenizer.ggml.pre`. The file stores only that name,
  so the split rules below are the ones llama.cpp applies for each name (llama-vocab.cpp).
- `llama`: SentencePiece BPE. Tokens spell a space as "▁", carry scores, and bytes outside the vocabulary
  fall back to the tokens <0x00>..<0xFF>. Pieces are merged best score first, so merges are derived from
  the scores: a pair (a, b) ranks by the score of the token a + b (ties: longer left part first, then
  vocabulary order, as transformers' GGUF reader does).

Control tokens (token type 3) and the unknown token are special (whole in the text, skipped when decoding
with skip_special_tokens); user-defined ones (type 4) are matched whole but decoded as text.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tokenforge.config import ConfigError
from tokenforge.models.gguf_file import GGUFFile

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> the regexes that split the text, applied in turn (each splits the previous pieces)
PRE_TOKENIZERS = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2], "exaone": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "falcon3": [_LLAMA3],
    "smaug-bpe": [_LLAMA3], "dbrx": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "stablelm2": [_QWEN2],
}
# llama.cpp takes a whole pre-token straight from the vocabulary, merges or not, for Llama-3's vocabulary
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"}


@dataclass
class GGUFTokenizer:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: frozenset[int]


def tokenizer_from_gguf(file: GGUFFile) -> GGUFTokenizer:
    kind = file.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in file.metadata:
        raise ConfigError(f"{file.path}: no tokenizer in the file (fields 'tokenizer.ggml.model' and "
                          "'tokenizer.ggml.tokens' are needed)")
    if kind not in ("gpt2", "llama"):
        raise ConfigError(f"{file.path}: field 'tokenizer.ggml.model' is {kind!r}; supported: 'gpt2' (byte-level "
                          "BPE) and 'llama' (SentencePiece BPE)")
    tokens = file.need("tokenizer.ggml.tokens", list)
    types = file.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    tokenizer = _byte_level(file, tokens) if kind == "gpt2" else _sentencepiece(file, tokens)
    _add_special_tokens(tokenizer, tokens, types, file.get("tokenizer.ggml.unknown_token_id"))
    token = lambda name: _token(file, tokens, f"tokenizer.ggml.{name}_token_id")
    bos, eos = token("bos"), token("eos")
    add_bos = file.get("tokenizer.ggml.add_bos_token", kind == "llama")
    add_eos = file.get("tokenizer.ggml.add_eos_token", False)
    tokenizer.post_processor = _post_processor(tokens, bos if add_bos else None, eos if add_eos else None)
    eos_ids = {file.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")} - {None}
    return GGUFTokenizer(tokenizer, file.get("tokenizer.chat_template"), bos, eos, frozenset(eos_ids))


def _token(file: GGUFFile, tokens: list[str], key: str) -> str | None:
    token_id = file.get(key)
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise ConfigError(f"{file.path}: field {key!r} is {token_id}, outside the {len(tokens)}-token vocabulary")
    return tokens[token_id]


def _byte_level(file: GGUFFile, tokens: list[str]) -> Tokenizer:
    pre = file.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{file.path}: field 'tokenizer.ggml.pre' is {pre!r}; supported pre-tokenizers: "
                          f"{sorted(PRE_TOKENIZERS)}")
    merges = [tuple(m.split(" ", 1)) for m in file.need("tokenizer.ggml.merges", list)]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in PRE_TOKENIZERS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(file: GGUFFile, tokens: list[str]) -> Tokenizer:
    scores = file.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = _token(file, tokens, "tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab, _merges_by_score(tokens, scores), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = file.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_by_score(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scoring result first."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for merged, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[merged], -len(left), -len(right), merged, ids[left], ids[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for *_, left, right in ranked]


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], unk_id: int | None) -> None:
    special = [AddedToken(t, special=True, normalized=False) for i, (t, kind) in enumerate(zip(tokens, types))
               if t and (kind == CONTROL or i == unk_id)]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
            if t and kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)


def _post_processor(tokens: list[str], bos: str | None, eos: str | None):
    ids = {token: i for i, token in enumerate(tokens)}
    single = ([bos] if bos else []) + ["$A"] + ([eos] if eos else [])  # lists: a token may hold a space
    pair = single + ([bos] if bos else []) + ["$B"] + ([eos] if eos else [])
    used = sorted({t for t in (bos, eos) if t})
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[(t, ids[t]) for t in used])
