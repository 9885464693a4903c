"""Compiling constraints: every failure is a ValueError that names the problem, compiles are cached by
content and shared by concurrent callers, and a compile that takes too long is refused (and not cached)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import train_tokenizer
from tokenforge.bench.make_model import write_tokenizer
from tokenforge.structured import compiler as compiler_module
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.structured.params import StructuredOutputsParams as Spec
from tokenforge.tokenizer import TokenizerWrapper

BAD = [
    (Spec(json={"type": "foo"}), "the JSON schema is invalid or unsupported: Invalid type: foo"),
    (Spec(json={"type": "string", "format": "weird"}), "Unknown format: weird"),
    (Spec(json={"properties": {"a": {"$ref": "#/$defs/missing"}}}), "/$defs/missing"),
    (Spec(json={"type": "string", "pattern": "(unclosed"}), "unclosed group"),
    (Spec(json={"type": "integer", "minimum": 5, "maximum": 1}), "minimum (5) is greater than maximum (1)"),
    (Spec(json={"type": "array", "uniqueItems": True}), "Unimplemented keys: [\"uniqueItems\"]"),
    (Spec(json={"not": {"type": "string"}}), "Unimplemented keys: [\"not\"]"),
    (Spec(regex="(abc"), "the regex does not compile"),
    (Spec(regex="(?<=a)b"), "look-around"),
    (Spec(grammar="start: foo"), "the grammar does not compile: at 1(8): unknown name: \"foo\""),
    (Spec(grammar="start: /[/"), "unclosed character class"),
]


@pytest.mark.parametrize("spec, message", BAD, ids=[s.key[:40] for s, _ in BAD])
def test_bad_constraints_raise_value_error_naming_the_problem(compiler, spec, message):
    with pytest.raises(ValueError) as info:
        compiler.compile(spec)
    assert message in str(info.value)
    assert len(str(info.value)) < 800


def test_failures_are_not_cached_and_the_compiler_goes_on(compiler):
    spec = Spec(regex="(x")
    for _ in range(2):
        with pytest.raises(ValueError):
            compiler.compile(spec)
    assert spec.key not in compiler._cache
    assert compiler.compile(Spec(regex="x+")).matcher().validate_tokens([]) == 0


def test_compiles_are_cached_by_content(compiler):
    first = compiler.compile(Spec(json={"type": "object", "properties": {"q": {"type": "integer"}}}))
    again = compiler.compile(Spec(json='{"properties": {"q": {"type": "integer"}}, "type": "object"}'))
    assert again is first
    a, b = first.matcher(), first.matcher()
    a.accept_tokens(a_token_allowed(a))
    assert b.num_accepted == 0 and a.num_accepted == 1  # each request has its own state


def a_token_allowed(matcher) -> list[int]:
    import torch

    from tokenforge.structured.logits import unpack_bitmask

    bitmask = torch.zeros(1, (matcher.vocab_size + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(bitmask, 0)
    return [int(unpack_bitmask(bitmask, matcher.vocab_size)[0].nonzero()[0])]


def test_concurrent_callers_share_one_compile(tokenizer, monkeypatch):
    compiler = GrammarCompiler(tokenizer.tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    calls = []
    real = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda spec: calls.append(spec) or real(spec))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: compiler.compile(Spec(regex="[ab]{2,9}")), range(8)))
    assert len(calls) == 1 and all(r is results[0] for r in results)
    compiler.close()


def test_a_slow_compile_is_refused_then_the_next_request_is_served(tokenizer, monkeypatch):
    compiler = GrammarCompiler(tokenizer.tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids, timeout_s=0.2)
    release = threading.Event()
    real = compiler._compile

    def slow(spec):
        if spec.regex == "slow":
            release.wait(10)
        return real(spec)

    monkeypatch.setattr(compiler, "_compile", slow)
    with pytest.raises(ValueError, match="the regex did not compile within 0.2 s; simplify it"):
        compiler.compile(Spec(regex="slow"))
    assert Spec(regex="slow").key not in compiler._cache
    assert compiler.compile(Spec(regex="fast")) is not None  # the other worker is free
    release.set()
    compiler.close()


def test_the_limit_and_eos_are_checked(tokenizer):
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        GrammarCompiler(tokenizer.tokenizer, 10, [0], timeout_s=0)
    with pytest.raises(ValueError, match="EOS"):
        GrammarCompiler(tokenizer.tokenizer, 10, [])


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_error(tmp_path):
    write_tokenizer(tmp_path, 64)  # word-level: no byte decoder, so tokens have no known bytes
    words = TokenizerWrapper(tmp_path)
    compiler = GrammarCompiler(words.tokenizer, 64, [2])
    with pytest.raises(ValueError, match="this model's tokenizer cannot be used for structured output"):
        compiler.compile(Spec(regex="a"))
    compiler.close()


def test_a_model_vocabulary_wider_than_the_tokenizer_gets_a_wider_mask(tmp_path):
    tok = train_tokenizer(300)
    compiler = GrammarCompiler(tok, 320, [2])
    assert compiler.bitmask_width == 10
    matcher = compiler.matcher(Spec(choice=["ab"]))
    assert matcher.vocab_size == 320
    allowed = a_token_allowed(matcher)
    assert allowed[0] < 300  # padding ids past the tokenizer are never allowed
    compiler.close()


def test_long_errors_are_clipped():
    assert compiler_module._failure("regex", "x" * 5000).endswith(" ...")
