"""Checkpoint reading: both config.json dialects, sharded weights, and clear errors for broken folders."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenforge.config import ConfigError, ModelConfig
from tokenforge.layers.rotary import inverse_frequencies
from tokenforge.models.registry import load_model
from tokenforge.tokenizer import TokenizerWrapper


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_names_file_and_key(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=r"config.json.*'architectures'.*GPT2LMHeadModel"):
        ModelConfig.from_pretrained(path)


def test_missing_files_and_keys(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(empty)
    path = _copy(llama_dir, tmp_path)
    _edit_config(path, hidden_size=None)
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        ModelConfig.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(path)


def test_missing_or_misshapen_tensor(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"'model.layers.1.mlp.down_proj.weight' is missing"):
        load_model(ModelConfig.from_pretrained(path), torch.float32)
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"'model.norm.weight' has shape \(3,\)"):
        load_model(ModelConfig.from_pretrained(path), torch.float32)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        load_model(ModelConfig.from_pretrained(path), torch.float32)


def test_sharded_checkpoint_with_index(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path)
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(ModelConfig.from_pretrained(path), torch.float32)
    assert len(model.layers) == 2
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        load_model(ModelConfig.from_pretrained(path), torch.float32)


def test_transformers_4_and_5_rope_dialects_agree():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=64, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=4)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = ModelConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": scaling}, "x")
    v5 = ModelConfig.from_dict({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}}, "x")
    assert v4.rope == v5.rope and v4.rope.kind == "llama3" and v4.rope.theta == 500000.0
    plain = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "x")
    assert not torch.equal(inverse_frequencies(v4.rope, 16), inverse_frequencies(plain.rope, 16))
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "x")


def test_inconsistent_heads_is_a_config_error():
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=64, intermediate_size=8,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_dict(cfg, "x")


def test_tokenizer_and_chat_template(llama_dir, tmp_path):
    tok = TokenizerWrapper(llama_dir)
    ids = tok.encode("def f():")
    assert ids[0] == 1 and tok.decode(ids) == "def f():"
    assert 2 in tok.eos_token_ids
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>hi\n<|assistant|>"
    path = _copy(llama_dir, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json not found"):
        TokenizerWrapper(path)
