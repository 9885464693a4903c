"""Tokenizers rebuilt from GGUF metadata give the same ids as transformers' GGUF tokenizer on a varied corpus,
for both vocabulary kinds: byte-level BPE (`gpt2`, per pre-tokenizer) and SentencePiece BPE (`llama`, with
scores and byte fallback). Special tokens, BOS, decoding and the chat template come from the file too."""

import io

import pytest

from tests.conftest import CHAT_TEMPLATE, gguf_in
from tests.gguf_util import tokenizer_metadata, write_gguf
from tokenforge.tokenizer import TokenizerWrapper

CORPUS = [
    "Hello world!", "  two leading spaces", "trailing spaces   ", "tabs\tand\nnew\nlines\n\n\n",
    "numbers 1234567 and 3.14159, 2024-12-02", "héllo wörld 日本語 🙂 👩‍👩‍👧 Ωμέγα",
    "def f(x):\n    return x ** 2  # sq\n",
    "I'm sure they'll say WE'RE fine, it's", "a\u00a0b\u2003c", "", " ", "\n", "x" * 60, "مرحبا بالعالم",
    "Привет, мир!", "if (a<b && c>=d) { x += 1; }", "   \n  \t  \r\n end", "<s>special</s> tokens <unk> inside",
    "import os\nimport sys\nfor i in range(10):\n    print(i, os.getcwd())\n",
]
HPARAMS = {"max_position_embeddings": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512}


def transformers_tokenizer(file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


def assert_same_ids(ours: TokenizerWrapper, theirs, corpus=CORPUS) -> None:
    for text in corpus:
        assert ours.encode(text) == theirs.encode(text), repr(text)
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), repr(text)


def tokenizer_only(folder, tokenizer: dict, name="tok.gguf"):
    folder.mkdir(exist_ok=True)
    return write_gguf(folder / name, "llama", HPARAMS, {}, tokenizer)


def test_byte_level_vocabulary_matches_transformers(make_gguf):
    file = gguf_in(make_gguf("llama", "q4_0"))
    ours = TokenizerWrapper(file)
    assert_same_ids(ours, transformers_tokenizer(file))
    assert ours.encode("def")[0] == 1  # add_bos_token
    assert ours.encode("x<s>y</s>", add_special_tokens=False)[1] == 1  # control tokens are whole
    assert ours.decode(ours.encode("hi</s>")) == "hi"  # and skipped when decoding
    assert ours.eos_token_ids == {2} and ours.bos_token == "<s>" and ours.eos_token == "</s>"
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>hi\n<|assistant|>"


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default"])
def test_pre_tokenizers_match_transformers(tmp_path, tokenizer_dir, pre):
    file = tokenizer_only(tmp_path, {**tokenizer_metadata(tokenizer_dir, None), "pre": pre})
    assert_same_ids(TokenizerWrapper(file), transformers_tokenizer(file))


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path, tokenizer_dir):
    """llama.cpp's `smollm` rules isolate every digit before the GPT-2 split (transformers' GGUF reader does
    not know the name and falls back to GPT-2's; they agree on text without digits)."""
    meta = tokenizer_metadata(tokenizer_dir, None)
    smollm = TokenizerWrapper(tokenizer_only(tmp_path / "s", {**meta, "pre": "smollm"}))
    gpt2 = TokenizerWrapper(tokenizer_only(tmp_path / "g", {**meta, "pre": "gpt-2"}))
    pieces = [smollm.decode([i]) for i in smollm.encode("x 1024y", add_special_tokens=False)]
    assert "".join(pieces) == "x 1024y" and {"1", "0", "2", "4"} <= set(pieces)
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    text = "def fibonacci(n):\n    return n"
    assert smollm.encode(text) == gpt2.encode(text)


def test_unknown_pre_tokenizer_names_the_field(tmp_path, tokenizer_dir):
    from tokenforge.config import ConfigError

    file = tokenizer_only(tmp_path, {**tokenizer_metadata(tokenizer_dir, None), "pre": "klingon"})
    with pytest.raises(ConfigError, match=r"tok.gguf: field 'tokenizer.ggml.pre' is 'klingon'"):
        TokenizerWrapper(file)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A SentencePiece BPE vocabulary trained here (byte fallback on), written as llama.cpp's `llama` vocab."""
    import sentencepiece as spm

    lines = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokens: 12 345 6789!",
             "def fibonacci(n):    return n if n < 2 else fibonacci(n - 1)", "héllo wörld, çà et là"] * 30
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, character_coverage=1.0)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    kinds = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1
             for i in range(sp.get_piece_size())]
    tokenizer = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
                 "scores": [sp.get_score(i) for i in range(sp.get_piece_size())], "types": kinds,
                 "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True,
                 "chat_template": CHAT_TEMPLATE}
    return tokenizer_only(tmp_path_factory.mktemp("spm"), tokenizer), sp


def test_sentencepiece_vocabulary_matches_transformers(sentencepiece_gguf):
    file, sp = sentencepiece_gguf
    ours = TokenizerWrapper(file)
    assert_same_ids(ours, transformers_tokenizer(file))
    ids = ours.encode("Hello 日本", add_special_tokens=False)
    assert [sp.id_to_piece(i) for i in ids][:2] == ["▁Hello", "▁"] and sp.is_byte(ids[-1])  # bytes fall back
    assert ours.decode(ids) == "Hello 日本"
    assert ours.encode("Hello")[0] == sp.bos_id()
    simple = "The lazy fox says hello world"
    assert ours.encode(simple, add_special_tokens=False) == sp.encode(simple)  # and SentencePiece itself
