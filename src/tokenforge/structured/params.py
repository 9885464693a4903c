"""The request-side description of an output constraint: `StructuredOutputsParams`, a plain picklable value.

It says *what* the output must match (a JSON schema, any JSON object, a regex, one of a list of strings, or a
Lark/EBNF grammar) and nothing about *how*: compiling it for a tokenizer is `structured.compiler`'s job. It is
checked for shape at construction (exactly one constraint, right types); whether a schema or grammar is
valid is only known when it compiles.

Pure Python on purpose: `sampling_params.py` imports it, and the grammar engine stays out of light imports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# The constraint kinds, in the order error messages list them.
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: `json` (a JSON schema, as a dict or its JSON text), `json_object=True` (any JSON
    object), `regex`, `choice` (the output is one of these strings) or `grammar` (Lark, or GBNF/EBNF as
    llama.cpp writes it). vLLM's names, so its clients' `structured_outputs` map over field by field."""

    json: dict[str, Any] | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    _key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None)]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got {what}")
        if self.json is not None:
            object.__setattr__(self, "json", _schema(self.json))
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"structured_outputs.regex must be a non-empty string, got {self.regex!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise ValueError(f"structured_outputs.grammar must be a non-empty string, got {self.grammar!r}")
        if self.choice is not None:
            object.__setattr__(self, "choice", _choices(self.choice))
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be true or false, got {self.json_object!r}")
        try:
            text = json.dumps(self.value, sort_keys=True)
        except (TypeError, ValueError) as e:  # a dict holding non-JSON values, or a circular one
            raise ValueError(f"structured_outputs.{self.kind} must be plain JSON data ({e})") from None
        object.__setattr__(self, "_key", f"{self.kind}:{text}")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of `KINDS`."""
        return next(k for k in KINDS if (self.json_object if k == "json_object" else getattr(self, k) is not None))

    @property
    def value(self) -> Any:
        return True if self.kind == "json_object" else getattr(self, self.kind)

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal constraints (dict key order aside) have equal keys, so
        compiled grammars are cached by it. Content, not `hash()`, so it can leave the process."""
        return self._key

    @classmethod
    def from_dict(cls, value: dict) -> StructuredOutputsParams:
        """From the request body's `structured_outputs` object (unknown keys are an error)."""
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown key(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(KINDS)}")
        return cls(**value)


def _schema(value) -> dict | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON text ({e})") from None
    if not isinstance(value, dict | bool):
        raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {type(value).__name__}")
    return value


def _choices(value) -> list[str]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("structured_outputs.choice must be a non-empty list of strings")
    if not all(isinstance(c, str) and c for c in value):
        raise ValueError("structured_outputs.choice must contain only non-empty strings")
    return list(value)
