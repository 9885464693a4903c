"""Small GGUF files for the tests, written with `gguf.GGUFWriter` the way llama.cpp's converter lays them out
(its tensor names, Q/K rows of `llama` models permuted for its rotary kernel, vocabulary as metadata).

The name table and the permutation here are written independently of tokenforge's, so a mistake on one
side shows up as a mismatch against transformers rather than cancelling out.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

Q = gguf.GGMLQuantizationType
ENCODINGS = {"f32": None, "f16": None, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def converted_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_PER_LAYER[rest]}"


def permute_for_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> llama.cpp's interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, encoding: str) -> tuple[np.ndarray, Q | None]:
    """A float32 tensor as the writer takes it: matrices in `encoding`, vectors always float32."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or encoding == "f32":
        return w, None
    if encoding == "f16":
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, ENCODINGS[encoding]), ENCODINGS[encoding]


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K rows (any bytes are valid quants) with float16 scales that keep |w| around 0.1."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)

    def f16(offset: int, scale: float) -> None:
        values = rng.uniform(0.5, 1.5, blocks.shape[:2]) * scale
        blocks[..., offset:offset + 2] = values.astype(np.float16)[..., None].view(np.uint8)

    if qtype == Q.Q4_K:
        f16(0, 3e-4)  # d: weights d * scale6 * q4 ...
        f16(2, 2e-3)  # dmin: ... - dmin * min6
    else:
        f16(208, 1.2e-4)  # d: weights d * scale8 * (q6 - 32)
    return blocks.reshape(rows, -1)


def tokenizer_metadata(tokenizer_dir: Path, chat_template: str | None) -> dict:
    """The byte-level BPE fixture tokenizer as llama.cpp's `gpt2` vocabulary metadata."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": merges,
            "types": [3 if t in specials else 1 for t in tokens], "bos": vocab["<s>"], "eos": vocab["</s>"],
            "unk": vocab["<unk>"], "add_bos": True, "chat_template": chat_template}


def write_gguf(out: Path, arch: str, hparams: dict, tensors: dict[str, tuple[np.ndarray, Q | None]],
               tokenizer: dict | None, name: str = "tiny test model", extra=None) -> Path:
    """hparams: Hugging Face config keys; tensors: GGUF name -> (array, raw type or None); extra(writer)
    adds more metadata."""
    w = gguf.GGUFWriter(out, arch)
    w.add_name(name)
    w.add_context_length(hparams["max_position_embeddings"])
    w.add_embedding_length(hparams["hidden_size"])
    w.add_feed_forward_length(hparams["intermediate_size"])
    w.add_block_count(hparams["num_hidden_layers"])
    w.add_head_count(hparams["num_attention_heads"])
    w.add_head_count_kv(hparams["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    rope = hparams.get("rope_parameters") or {}  # transformers 5 writes rope_theta in there
    w.add_rope_freq_base(hparams.get("rope_theta") or rope.get("rope_theta", 10000.0))
    head_dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(hparams["vocab_size"])
    if tokenizer is not None:
        add_tokenizer(w, tokenizer)
    if extra is not None:
        extra(w)
    for tensor_name, (array, raw) in tensors.items():
        w.add_tensor(tensor_name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_tokenizer(w: gguf.GGUFWriter, tok: dict) -> None:
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_unk_token_id(tok["unk"])
    w.add_add_bos_token(tok["add_bos"])
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])


def gguf_from_checkpoint(checkpoint: Path, out: Path, encoding: str = "f32", chat_template: str | None = None,
                         drop: tuple[str, ...] = ()) -> Path:
    """The fixture checkpoint's very weights as llama.cpp would convert them, matrices in `encoding`."""
    config = json.loads((checkpoint / "config.json").read_text())
    arch = GGUF_ARCH[config["model_type"]]
    weights = load_file(checkpoint / "model.safetensors")
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    tensors = {}
    for hf_name, w in weights.items():
        w = w.astype(np.float32)
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            w = permute_for_llama_cpp(w, config["num_attention_heads"] if ".q_proj." in hf_name else kv_heads)
        if converted_name(hf_name) not in drop:
            tensors[converted_name(hf_name)] = encode(w, encoding)
    return write_gguf(out, arch, config, tensors, tokenizer_metadata(checkpoint, chat_template))


def write_k_quant_llama(out: Path, tokenizer_dir: Path, chat_template: str | None, seed: int,
                        dense_up_in_layer_1: bool) -> Path:
    """A Q4_K_M-like 2-layer llama with blocks built directly (gguf has no K-quant quantizer): Q and K Q4_K,
    V Q6_K (a fused q/k/v of two formats), o Q8_0, gate and up Q4_K (with `dense_up_in_layer_1`, layer 1's
    up is F16: a fused gate/up of a quantized and a dense part), down Q6_K, the embedding Q6_K and the untied
    head Q4_K."""
    rng = np.random.default_rng(seed)
    h, m, layers, vocab = 256, 512, 2, 512
    hparams = {"max_position_embeddings": 128, "hidden_size": h, "intermediate_size": m, "num_hidden_layers": layers,
               "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab}
    kv = 2 * h // 4

    def k(rows, cols, qtype):
        return random_k_blocks(rows, cols, qtype, rng), qtype

    def norm():
        return rng.uniform(0.8, 1.2, h).astype(np.float32), None

    tensors = {"token_embd.weight": k(vocab, h, Q.Q6_K), "output.weight": k(vocab, h, Q.Q4_K),
               "output_norm.weight": norm()}
    for i in range(layers):
        dense_up = dense_up_in_layer_1 and i == 1
        up = (rng.normal(0, 0.1, (m, h)).astype(np.float16), None) if dense_up else k(m, h, Q.Q4_K)
        tensors |= {f"blk.{i}.attn_norm.weight": norm(), f"blk.{i}.ffn_norm.weight": norm(),
                    f"blk.{i}.attn_q.weight": k(h, h, Q.Q4_K), f"blk.{i}.attn_k.weight": k(kv, h, Q.Q4_K),
                    f"blk.{i}.attn_v.weight": k(kv, h, Q.Q6_K),
                    f"blk.{i}.attn_output.weight": (
                        gguf.quants.quantize(rng.normal(0, 0.1, (h, h)).astype(np.float32), Q.Q8_0), Q.Q8_0),
                    f"blk.{i}.ffn_gate.weight": k(m, h, Q.Q4_K), f"blk.{i}.ffn_up.weight": up,
                    f"blk.{i}.ffn_down.weight": k(h, m, Q.Q6_K)}
    write_gguf(out, "llama", hparams, tensors, tokenizer_metadata(tokenizer_dir, chat_template))
    return out
