"""The request-side spec and the new SamplingParams fields: exactly one constraint, clear errors, values
that pickle and key equal constraints equally."""

from __future__ import annotations

import pickle

import pytest

from tokenforge.sampling_params import SamplingParams
from tokenforge.structured.params import StructuredOutputsParams


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of json, json_object, regex, choice, grammar; got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex and choice"),
    ({"json": {"type": "object"}, "json_object": True}, "got json and json_object"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"grammar": "  "}, "grammar must be a non-empty string"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": ["a", ""]}, "only non-empty strings"),
    ({"choice": "ab"}, "choice must be a non-empty list"),
    ({"json": "{not json"}, "json is not valid JSON text"),
    ({"json": 5}, "must be a JSON schema (an object)"),
    ({"json": {"a": {1, 2}}}, "must be plain JSON data"),
    ({"json_object": "yes"}, "json_object must be true or false"),
])
def test_bad_specs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        StructuredOutputsParams(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key\\(s\\) backend"):
        StructuredOutputsParams.from_dict({"regex": "a", "backend": "xgrammar"})
    assert StructuredOutputsParams.from_dict({"choice": ["x"]}).kind == "choice"


def test_the_key_is_canonical_and_kinds_differ():
    a = StructuredOutputsParams(json={"type": "object", "required": ["x"]})
    b = StructuredOutputsParams(json='{"required": ["x"], "type": "object"}')  # JSON text, other key order
    assert a.key == b.key and a.json == b.json
    assert StructuredOutputsParams(regex="abc").key != StructuredOutputsParams(grammar="abc").key
    assert StructuredOutputsParams(json_object=True).kind == "json_object"


def test_specs_and_sampling_params_pickle():
    params = SamplingParams(structured_outputs={"regex": "[0-9]+"}, logit_bias={5: -3.5}, allowed_token_ids=[1, 5],
                            bad_words=["foo"])
    copy = pickle.loads(pickle.dumps(params))
    assert copy == params and copy.structured_outputs.key == params.structured_outputs.key
    assert isinstance(copy.structured_outputs, StructuredOutputsParams) and copy.constrained


@pytest.mark.parametrize("kwargs, message", [
    ({"logit_bias": {-1: 1.0}}, "logit_bias must be keyed by token ids >= 0"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias must be keyed by token ids >= 0"),
    ({"logit_bias": {5: 101}}, "logit_bias must be values in \\[-100, 100\\]"),
    ({"logit_bias": {5: float("nan")}}, "logit_bias must be values in"),
    ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
    ({"allowed_token_ids": [3, True]}, "allowed_token_ids must be a non-empty list"),
    ({"bad_words": ["ok", " "]}, "bad_words must be a list of non-blank strings"),
    ({"structured_outputs": "json"}, "structured_outputs must be a StructuredOutputsParams or a dict"),
    ({"structured_outputs": {}}, "exactly one of"),
])
def test_sampling_params_check_the_new_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unconstrained_params_stay_unconstrained():
    assert not SamplingParams().constrained
    assert SamplingParams(bad_words="x").bad_words == ["x"]
