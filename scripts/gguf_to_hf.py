"""Write a GGUF Llama-family model out as a Hugging Face checkpoint folder (float32 safetensors, config.json,
tokenizer.json, tokenizer_config.json with the chat template), so that engines that cannot read GGUF, such
as vLLM's CPU build, can serve the same weights side by side with tokenforge. Quantized tensors are
dequantized exactly as tokenforge's reference path does; llama's Q/K rows come back in Hugging Face order.

    .venv/bin/python scripts/gguf_to_hf.py smollm2 /tmp/smollm2-hf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenforge.config import ModelConfig
from tokenforge.models.catalog import resolve_model
from tokenforge.models.gguf import GGUFSource
from tokenforge.models.gguf_file import find_gguf, hf_config, read_gguf
from tokenforge.tokenizer import TokenizerWrapper


def main(argv: list[str]) -> int:
    model, out = resolve_model(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    file = find_gguf(model)
    config = hf_config(read_gguf(file))
    cfg = ModelConfig.from_pretrained(model)
    source = GGUFSource(file)
    h, d, m, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
                   p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
                   p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
                   p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m)}
        if cfg.qkv_bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (n,) for x, n in
                       (("q", cfg.num_heads * d), ("k", cfg.num_kv_heads * d), ("v", cfg.num_kv_heads * d))}
    if source.has("lm_head.weight"):
        shapes["lm_head.weight"] = (v, h)
    tensors = {name: source.get(name, shape, torch.float32).contiguous() for name, shape in shapes.items()}
    save_file(tensors, str(out / "model.safetensors"))
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
    config |= {"model_type": model_type[config["architectures"][0]], "torch_dtype": "float32",
               "tie_word_embeddings": "lm_head.weight" not in tensors}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = TokenizerWrapper(model)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
         "chat_template": tok.chat_template, "model_max_length": cfg.max_model_len}, indent=2))
    print(f"{out}: {len(tensors)} tensors from {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
