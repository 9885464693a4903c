"""The weight source and the linear factory: the model is built the same way whatever stores its weights."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenforge.config import ConfigError, ModelConfig
from tokenforge.layers.factory import LinearFactory
from tokenforge.layers.linear import Linear
from tokenforge.layers.quant import Int8Linear
from tokenforge.models.registry import load_model
from tokenforge.models.weights import QuantizedTensor, SafetensorsSource


def test_factory_fuses_named_weights_in_order(llama_dir):
    source = SafetensorsSource(llama_dir)
    names = [f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up")]
    layer = LinearFactory(source, torch.float32).linear(names, [128, 128], 64)
    assert isinstance(layer, Linear)
    expected = torch.cat([source.get(n, (128, 64), torch.float32) for n in names])
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ expected.T, rtol=1e-5, atol=1e-5)


def test_int8_method_quantizes_every_linear(llama_dir):
    cfg = ModelConfig.from_pretrained(llama_dir)
    model = load_model(cfg, torch.float32, quantization="int8")
    linears = [m for m in model.modules() if isinstance(m, (Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    with pytest.raises(ConfigError, match="quantization must be one of"):
        load_model(cfg, torch.float32, quantization="int3")


def test_quantized_tensor_without_a_layer_is_a_clear_error(llama_dir):
    class Fake(SafetensorsSource):
        def stored(self, name, shape):
            if name.endswith("o_proj.weight"):
                return QuantizedTensor("q9_x", torch.zeros(shape[0], 8, dtype=torch.uint8), shape)
            return super().stored(name, shape)

    with pytest.raises(ConfigError, match=r"o_proj.weight.*stored as \['q9_x'\]"):
        load_model(ModelConfig.from_pretrained(llama_dir), torch.float32, source=Fake(llama_dir))


def test_fingerprint_is_stable_across_processes_and_follows_content(llama_dir, tmp_path):
    here = SafetensorsSource(llama_dir).fingerprint()
    code = f"from tokenforge.models.weights import SafetensorsSource; print(SafetensorsSource({str(llama_dir)!r})" \
           ".fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == here
    copy = tmp_path / "ckpt"
    shutil.copytree(llama_dir, copy)
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, copy / "model.safetensors")
    assert SafetensorsSource(copy).fingerprint() != here
