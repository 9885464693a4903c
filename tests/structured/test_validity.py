"""Every output a constraint admits is valid: random walks through the masks (no model, see walk.py) of
54 JSON schemas, JSON object mode, regexes, choices and grammars, each output checked by an independent
validator (`jsonschema` for schemas, Python's `re` for regexes)."""

from __future__ import annotations

import datetime
import json
import random
import re

import jsonschema
import pytest

from tests.structured.schemas import SCHEMAS
from tokenforge.structured.params import StructuredOutputsParams

NUM_WALKS = 3


def check_date_time(value: str) -> bool:
    # jsonschema checks date-time only with an optional package; Python's parser is strict enough here.
    return isinstance(value, str) and datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) is not None


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date-time", raises=ValueError)(check_date_time)


def test_there_are_at_least_50_schemas():
    assert len(SCHEMAS) >= 50


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_walk_through_a_schema_is_valid_json(name, compiler, walker, tokenizer):
    schema = SCHEMAS[name]
    compiled = compiler.compile(StructuredOutputsParams(json=schema))
    validator = jsonschema.Draft202012Validator(schema, format_checker=FORMATS)
    for seed in range(NUM_WALKS):
        ids, ended = walker.walk(compiled.matcher(), random.Random(seed))
        text = tokenizer.decode(ids)
        assert ended, f"walk {seed} did not end: {text!r}"
        validator.validate(json.loads(text))


def test_json_object_mode_gives_objects(compiler, walker, tokenizer):
    for seed in range(5):
        ids, ended = walker.walk(compiler.matcher(StructuredOutputsParams(json_object=True)), random.Random(seed))
        assert ended and isinstance(json.loads(tokenizer.decode(ids)), dict)


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[a-z]+@[a-z]+\.(com|org)", r"\d{1,3}(\.\d{1,3}){3}",
           r"(ab|cd)*e", r"[A-Z][a-z]{2,5}( [A-Z][a-z]{2,5})?", r"-?(0|[1-9][0-9]{0,4})(\.[0-9]{1,2})?",
           r"héllo|wörld|日本"]


@pytest.mark.parametrize("regex", REGEXES)
def test_every_walk_through_a_regex_matches_it(regex, compiler, walker, tokenizer):
    for seed in range(NUM_WALKS):
        ids, ended = walker.walk(compiler.matcher(StructuredOutputsParams(regex=regex)), random.Random(seed))
        assert ended and re.fullmatch(regex, tokenizer.decode(ids))


def test_every_walk_through_a_choice_is_one_of_them(compiler, walker, tokenizer):
    choices = ["positive", "negative", "neutral", "pos", "négatif 🙂", "a \"quoted\" one"]
    seen = set()
    for seed in range(30):
        ids, ended = walker.walk(compiler.matcher(StructuredOutputsParams(choice=choices)), random.Random(seed))
        text = tokenizer.decode(ids)
        assert ended and text in choices
        seen.add(text)
    assert len(seen) > 2  # the walk reaches several of them, so the mask is not stuck on one


LARK_SUM = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
GBNF_LIST = r"""
root ::= "[" item ("," item)* "]"
item ::= [a-z] [a-z]?
"""


def test_every_walk_through_a_lark_grammar_is_balanced_arithmetic(compiler, walker, tokenizer):
    for seed in range(10):
        ids, ended = walker.walk(compiler.matcher(StructuredOutputsParams(grammar=LARK_SUM)), random.Random(seed))
        text = tokenizer.decode(ids)
        assert ended and re.fullmatch(r"[0-9+\-()]+", text)
        python = re.sub(r"\b0+(?=[0-9])", "", text)  # Python refuses leading zeros the grammar allows
        assert isinstance(eval(python, {"__builtins__": {}}), int)  # digits, +, - and parentheses only


def test_a_gbnf_grammar_is_converted_and_enforced(compiler, walker, tokenizer):
    for seed in range(10):
        ids, ended = walker.walk(compiler.matcher(StructuredOutputsParams(grammar=GBNF_LIST)), random.Random(seed))
        assert ended and re.fullmatch(r"\[[a-z]{1,2}(,[a-z]{1,2})*\]", tokenizer.decode(ids))
