"""The checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, plus the chat template and
special tokens from tokenizer_config.json (rendered with jinja2, as transformers does); or, for a GGUF
file, all of these rebuilt from its metadata (`tokenizer_gguf.py`)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox
from tokenizers import Tokenizer

from tokenforge.config import ConfigError
from tokenforge.models.gguf_file import GGUFFile, find_gguf, read_gguf
from tokenforge.tokenizer_gguf import tokenizer_from_gguf


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


class TokenizerWrapper:
    def __init__(self, path: str | Path):
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            self._from_gguf(read_gguf(gguf_file))
        else:
            self._from_folder(Path(path))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _from_gguf(self, file: GGUFFile) -> None:
        built = tokenizer_from_gguf(file)
        self.tokenizer, self.chat_template = built.tokenizer, built.chat_template
        self.config: dict = {}
        self.bos_token, self.eos_token, self.eos_token_ids = built.bos_token, built.eos_token, built.eos_token_ids

    def _from_folder(self, path: Path) -> None:
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"{tok_file} not found: tokenforge reads the fast-tokenizer file tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises plain Exception on a bad file
            raise ConfigError(f"{tok_file}: cannot be loaded by the tokenizers library ({e})") from None
        self.config = self._read_json(path / "tokenizer_config.json")
        self.chat_template = self._chat_template(path)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_token_ids = self._eos_ids(path)

    @staticmethod
    def _read_json(file: Path) -> dict:
        if not file.is_file():
            return {}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None

    def _chat_template(self, path: Path) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return template

    def _eos_ids(self, path: Path) -> frozenset[int]:
        ids = set()
        if self.eos_token is not None and self.tokenizer.token_to_id(self.eos_token) is not None:
            ids.add(self.tokenizer.token_to_id(self.eos_token))
        gen = self._read_json(path / "generation_config.json").get("eos_token_id")
        ids.update(gen if isinstance(gen, list) else [] if gen is None else [gen])
        return frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; ValueError for text that is not valid Unicode (a lone surrogate)."""
        check_text(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _template_env(self) -> jinja2.Environment:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message):
            raise ValueError(message)

        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        return env

    def chat_template_uses(self, variable: str) -> bool:
        """Whether the chat template reads `variable` (e.g. `tools`: it renders tool definitions itself)."""
        if not self.chat_template:
            return False
        try:
            ast = self._template_env().parse(self.chat_template)
        except jinja2.TemplateSyntaxError:
            return False  # rendering reports the syntax error
        return variable in jinja2.meta.find_undeclared_variables(ast)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render with the model's template. `tools` (OpenAI tool dicts) is passed as the `tools` variable,
        as Hugging Face templates take it; templates that do not read it ignore it."""
        if not self.chat_template:
            raise ConfigError("this model has no chat template (tokenizer_config.json's chat_template, or GGUF's "
                              "tokenizer.chat_template); use completions instead")
        env = self._template_env()
        extra = {"tools": tools} if tools else {}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None


def check_text(text: str) -> None:
    """Raise ValueError if `text` holds a lone surrogate (JSON's "\\ud800" decodes to one): such text has no
    UTF-8 form, so it cannot be tokenized."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}, which is "
                         "not valid Unicode text; send valid UTF-8") from None
