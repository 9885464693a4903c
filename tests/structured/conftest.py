"""Shared fixtures: the demo model's tokenizer (a real 4,096-token byte-level BPE) and one grammar compiler
for it, shared by the whole package since compiles are cached by content."""

from __future__ import annotations

import pytest

from tests.structured.walk import Walker
from tokenforge.config import DEMO_MODEL_DIR
from tokenforge.structured.compiler import GrammarCompiler
from tokenforge.tokenizer import TokenizerWrapper


@pytest.fixture(scope="session")
def tokenizer() -> TokenizerWrapper:
    return TokenizerWrapper(DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def compiler(tokenizer) -> GrammarCompiler:
    compiler = GrammarCompiler(tokenizer.tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    yield compiler
    compiler.close()


@pytest.fixture(scope="session")
def walker(tokenizer, compiler) -> Walker:
    return Walker(tokenizer, compiler.vocab_size, compiler.eos_token_ids)
