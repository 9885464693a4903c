"""Reading GGUF files: the config its metadata describes, tensors under Hugging Face names (llama's Q/K rows
put back in order, quantized rows moved as bytes), how a path finds its file, formats decoded at load,
the fingerprint, and one clear error naming the file and the field or tensor for each kind of bad file."""

import dataclasses
import logging
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.conftest import CHAT_TEMPLATE, gguf_in
from tests.gguf_util import Q, encode, gguf_from_checkpoint, write_gguf
from tokenforge.config import ConfigError, ModelConfig
from tokenforge.layers.quant_linear import quantize_blocks
from tokenforge.models.gguf import GGUFSource, gguf_name
from tokenforge.models.gguf_file import find_gguf
from tokenforge.models.registry import load_model
from tokenforge.models.weights import QuantizedTensor, open_weights
from tokenforge.tokenizer import TokenizerWrapper

HPARAMS = {"max_position_embeddings": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 32}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "llama3-tied"])
def test_config_equals_the_checkpoints(make_gguf, checkpoints, arch):
    got = ModelConfig.from_pretrained(make_gguf(arch))
    want = ModelConfig.from_pretrained(checkpoints[arch])
    keep = dict(path=want.path, architecture=want.architecture)
    if arch == "llama3-tied":  # the Llama-3 rule travels as a rope_freqs tensor (tests/reference/test_gguf.py)
        keep["rope"] = want.rope
    assert dataclasses.replace(got, **keep) == want
    assert got.architecture == ("llama" if arch == "mistral" else want.architecture)  # llama.cpp's name for both


def test_hugging_face_names_map_to_gguf_names():
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.12.self_attn.q_proj.bias") == "blk.12.attn_q.bias"
    assert gguf_name("model.layers.0.self_attn.k_norm.weight") == "blk.0.attn_k_norm.weight"
    assert gguf_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    assert gguf_name("model.layers.3.mlp.rotary.weight") is None


@pytest.mark.parametrize("encoding", ["f32", "q8_0"])
def test_llama_q_and_k_rows_come_back_in_hugging_face_order(make_gguf, llama_dir, encoding):
    source = GGUFSource(gguf_in(make_gguf("llama", encoding)))
    hf = load_file(llama_dir / "model.safetensors")
    for proj, rows in (("q", 64), ("k", 32), ("v", 32)):
        name = f"model.layers.1.self_attn.{proj}_proj.weight"
        want = torch.from_numpy(hf[name])
        stored = source.stored(name, (rows, 64))
        if encoding == "f32":
            assert torch.equal(stored, want)
        else:  # blocks are per row, so quantizing the original rows gives the very bytes put back in order
            assert isinstance(stored, QuantizedTensor) and torch.equal(stored.data, quantize_blocks(want, "q8_0").data)


def test_a_path_finds_its_file(make_gguf, llama_dir, tmp_path):
    folder = make_gguf("llama", "q8_0")
    assert find_gguf(folder) == gguf_in(folder) == find_gguf(gguf_in(folder))
    assert find_gguf(llama_dir) is None
    both = tmp_path / "hf-and-gguf"
    shutil.copytree(llama_dir, both)
    shutil.copy(gguf_in(folder), both)
    assert find_gguf(both) is None  # a Hugging Face folder stays one
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_in(folder), two / name)
    with pytest.raises(ConfigError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        ModelConfig.from_pretrained(two)


def test_tied_embedding_is_read_once(make_gguf):
    source = open_weights(make_gguf("qwen2", "q4_0"))
    assert isinstance(source, GGUFSource) and not source.has("lm_head.weight")
    first = source.stored("model.embed_tokens.weight", (512, 64))
    assert source.stored("model.embed_tokens.weight", (512, 64)) is first


def test_fingerprint_is_stable_across_processes_and_follows_content(make_gguf, tmp_path):
    file = gguf_in(make_gguf("llama", "q4_0"))
    here = GGUFSource(file).fingerprint()
    code = f"from tokenforge.models.gguf import GGUFSource; print(GGUFSource({str(file)!r}).fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == here
    changed = tmp_path / "changed.gguf"
    data = bytearray(file.read_bytes())
    data[-100] ^= 0xFF  # one weight byte
    changed.write_bytes(bytes(data))
    assert GGUFSource(changed).fingerprint() != here


def test_other_formats_load_dequantized_with_one_log_line(llama_dir, tmp_path, caplog):
    folder = tmp_path / "q5"
    folder.mkdir()
    gguf_from_checkpoint(llama_dir, folder / "q5.gguf", "f32", CHAT_TEMPLATE)
    reader = gguf.GGUFReader(gguf_in(folder))
    tensors = {t.name: (np.array(t.data), None) for t in reader.tensors}
    for name in ("blk.0.ffn_up.weight", "blk.1.attn_v.weight"):
        tensors[name] = (gguf.quants.quantize(tensors[name][0], Q.Q5_0), Q.Q5_0)
    (folder / "q5.gguf").unlink()
    write_gguf(folder / "q5.gguf", "llama", dict(HPARAMS, num_hidden_layers=2, vocab_size=512), tensors, None)
    with caplog.at_level(logging.WARNING, logger="tokenforge.models.gguf"):
        source = GGUFSource(folder / "q5.gguf")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Q5_0" in lines[0]
    assert "blk.0.ffn_up.weight" in lines[0] and "blk.1.attn_v.weight" in lines[0]
    up = source.stored("model.layers.0.mlp.up_proj.weight", (128, 64))
    assert up.dtype == torch.float32
    want = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"][0], Q.Q5_0)
    assert np.array_equal(up.numpy(), want)


def _tiny(tmp_path, arch="llama", tensors=None, tokenizer=None, name="m.gguf", extra=None, **hparams):
    rng = np.random.default_rng(0)
    if tensors is None:
        tensors = {"token_embd.weight": encode(rng.normal(size=(32, 64)), "f32")}
    return write_gguf(tmp_path / name, arch, {**HPARAMS, **hparams}, tensors, tokenizer, extra=extra)


def test_rope_scaling_fields(tmp_path):
    def scaling(kind):
        return lambda w: (w.add_rope_scaling_type(kind), w.add_rope_scaling_factor(4.0))

    cfg = ModelConfig.from_pretrained(_tiny(tmp_path, extra=scaling(gguf.RopeScalingType.LINEAR)))
    assert (cfg.rope.kind, cfg.rope.factor, cfg.rope.theta) == ("linear", 4.0, 10000.0)
    assert cfg.tie_word_embeddings and cfg.head_dim == 16 and cfg.rms_norm_eps == 1e-5 and cfg.max_model_len == 64
    with pytest.raises(ConfigError, match=r"field 'llama.rope.scaling.type' is 'yarn'; supported: none, linear"):
        ModelConfig.from_pretrained(_tiny(tmp_path, name="y.gguf", extra=scaling(gguf.RopeScalingType.YARN)))


def test_bf16_and_f16_tensors_come_back_dense(tmp_path):
    w = np.random.default_rng(1).normal(size=(32, 64)).astype(np.float32)
    bf16 = gguf.quants.quantize(w, Q.BF16)
    file = _tiny(tmp_path, tensors={"token_embd.weight": (bf16, Q.BF16), "output.weight": encode(w, "f16")})
    source = GGUFSource(file)
    embed = source.stored("model.embed_tokens.weight", (32, 64))
    assert embed.dtype == torch.bfloat16
    assert torch.equal(embed, torch.from_numpy(gguf.quants.dequantize(bf16, Q.BF16)).to(torch.bfloat16))
    head = source.stored("lm_head.weight", (32, 64))
    assert head.dtype == torch.float16 and torch.equal(head, torch.from_numpy(w).half())


def test_a_truncated_file_names_the_file(make_gguf, tmp_path):
    file = gguf_in(make_gguf("llama", "q8_0"))
    data = file.read_bytes()
    for size in (len(data) // 2, 100, len(data) - 1):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ConfigError, match=rf"{cut}.*truncated"):
            ModelConfig.from_pretrained(cut)


def test_unknown_architecture_names_the_field(tmp_path):
    file = _tiny(tmp_path, arch="gpt2")
    with pytest.raises(ConfigError, match=r"m.gguf: field 'general.architecture' is 'gpt2'; supported"):
        ModelConfig.from_pretrained(file)


def test_missing_field_names_the_field(tmp_path):
    file = _tiny(tmp_path)
    data = file.read_bytes().replace(b"llama.block_count", b"llama.bl0ck_count")
    file.write_bytes(data)
    with pytest.raises(ConfigError, match=r"m.gguf: required field 'llama.block_count' is missing"):
        ModelConfig.from_pretrained(file)


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    q8_k = np.zeros((32, gguf.GGML_QUANT_SIZES[Q.Q8_K][1]), dtype=np.uint8)  # gguf cannot decode Q8_K
    file = _tiny(tmp_path, tensors={"token_embd.weight": (q8_k, Q.Q8_K)}, embedding_length=256, hidden_size=256)
    with pytest.raises(ConfigError, match=r"m.gguf: tensor 'token_embd.weight' is stored as Q8_K"):
        open_weights(file)


def test_missing_tokenizer_names_the_field(tmp_path):
    file = _tiny(tmp_path)
    with pytest.raises(ConfigError, match=r"m.gguf: no tokenizer in the file.*'tokenizer.ggml.model'"):
        TokenizerWrapper(file)


def test_missing_tensor_names_it(llama_dir, tmp_path):
    gguf_from_checkpoint(llama_dir, tmp_path / "m.gguf", "q8_0", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(ConfigError, match=r"m.gguf: tensor 'blk.1.ffn_down.weight' for "
                                          r"'model.layers.1.mlp.down_proj.weight' in the file"):
        load_model(ModelConfig.from_pretrained(tmp_path / "m.gguf"), torch.float32)


def test_the_bulk_reader_reads_what_the_stock_reader_reads(make_gguf):
    import gguf

    from tokenforge.models.gguf_file import _Reader, find_gguf

    path = find_gguf(make_gguf("qwen2", "q8_0"))
    fast, stock = _Reader(path), gguf.GGUFReader(path)
    assert {k: f.contents() for k, f in fast.fields.items()} == {k: f.contents() for k, f in stock.fields.items()}
    assert len(fast.fields["tokenizer.ggml.tokens"].contents()) > 100  # arrays of strings and numbers were read
    assert [(t.name, t.data_offset, t.n_bytes) for t in fast.tensors] == \
        [(t.name, t.data_offset, t.n_bytes) for t in stock.tensors]
