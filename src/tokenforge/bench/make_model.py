"""Building random-weight Llama checkpoints to benchmark and test on, with no download.

The result is a complete Hugging Face folder (config, safetensors weights, generation config, a fast
tokenizer whose vocabulary covers every id), so tokenforge, transformers and vLLM all load it as they
would a real model. Random weights are fine for speed: the work per token depends on the shapes only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2: the ids the workload keeps out of random prompts

SHAPE_MAX_LEN = 2048
SHAPES = {
    # The shape of HuggingFaceTB/SmolLM2-135M.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=SHAPE_MAX_LEN,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # Small enough for tests; head_dim 32 is one vLLM's CPU attention supports, GQA still exercised.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=4096, max_position_embeddings=SHAPE_MAX_LEN,
                 rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer with exactly `vocab_size` tokens: specials, then t3, t4, ...

    Written with `tokenizers` directly and a plain `PreTrainedTokenizerFast` config, which transformers
    4.x and 5.x both load (5.x's own `save_pretrained` names a class 4.x does not have).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {UNK: 0, BOS: 1, EOS: 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (UNK, BOS, EOS)])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "bos_token": BOS,
              "eos_token": EOS, "model_max_length": SHAPE_MAX_LEN, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_model(out_dir: str | Path, shape: str, dtype: str = "float32", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `shape` to `out_dir` (created if missing) and return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"--shape must be one of {sorted(SHAPES)}, got {shape!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(out)
    write_tokenizer(out, config.vocab_size)
    return out
