"""Shared fixtures: tiny random checkpoints of each supported architecture, saved in Hugging Face layout.

Models are built with `transformers` (the reference, a dev dependency) so that both sides load the very
same files; a small byte-level BPE tokenizer trained here makes each folder a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 512
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama3-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0, num_key_value_heads=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=32)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}


def train_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "The quick brown fox jumps over the lazy dog. Hello world! héllo wörld 日本語 🙂",
        "import os\nimport sys\nfor i in range(10):\n    print(i, os.getcwd())\n",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return path


def make_checkpoint(arch: str, out: Path, tokenizer_dir: Path, dtype=torch.float32, seed: int = 0,
                    **overrides) -> Path:
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the default init spread the logits, so greedy has no near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "bias" not in str(p.shape):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(arch, root / arch, tokenizer_dir) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(checkpoints) -> Path:
    return checkpoints["llama"]


def hf_model(path: Path, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def varied_prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def make_gguf(tmp_path_factory, checkpoints, tokenizer_dir):
    """make_gguf(arch, encoding) -> a folder holding one GGUF file: the fixture checkpoint of `arch` converted
    as llama.cpp would, its matrices in `encoding` (f32, f16, q8_0, q4_0, q4_1). "qwen3-hd128" is Qwen3 with
    head_dim 128, the only kind transformers' GGUF reader can load (it ignores key_length and keeps
    Qwen3Config's default of 128)."""
    from tests.gguf_util import gguf_from_checkpoint

    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str], Path] = {}

    def make(arch: str, encoding: str = "f32") -> Path:
        if (arch, encoding) not in made:
            if arch == "qwen3-hd128":
                source = root / arch / "hf"
                if not source.exists():
                    make_checkpoint("qwen3", source, tokenizer_dir, head_dim=128)
            else:
                source = checkpoints[arch]
            folder = root / arch / encoding
            folder.mkdir(parents=True)
            gguf_from_checkpoint(source, folder / f"tiny-{encoding}.gguf", encoding, CHAT_TEMPLATE)
            made[arch, encoding] = folder
        return made[arch, encoding]

    return make


def gguf_in(folder: Path) -> Path:
    return next(folder.glob("*.gguf"))


def hf_gguf_model(folder: Path, dtype=torch.float32):
    """transformers' own reading of a GGUF file (it dequantizes every tensor to `dtype`)."""
    import transformers

    file = gguf_in(folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file.name, dtype=dtype).eval()


@pytest.fixture
def pin_plans(monkeypatch):
    """`pin_plans(choose)`: each matmul layer built from now on takes `choose(candidates)` (a MatmulPlan, or
    None for the plan this machine measures) rather than a measured plan. Tests that compare runs whose
    batches differ pin layers to paths whose rows do not change each other's sums: a measured plan may
    switch kernels between two row counts, and a token's numbers then depend on its batch."""
    from tokenforge import matmul_plan

    real = matmul_plan.calibrate
    saved = dict(matmul_plan._PLANS)
    matmul_plan._PLANS.clear()

    def pin(choose):
        def calibrate(key, candidates, in_features, evict=lambda *weights: None):
            plan = choose(candidates)
            if plan is None:
                return real(key, candidates, in_features, evict)
            matmul_plan._PLANS[key] = plan
            return plan

        matmul_plan._PLANS.clear()
        monkeypatch.setattr(matmul_plan, "calibrate", calibrate)

    yield pin
    matmul_plan._PLANS.clear()
    matmul_plan._PLANS.update(saved)
