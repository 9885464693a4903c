"""Frozen configuration dataclasses: the model as read from config.json, the KV cache, the scheduler.

Each is validated once, with errors that name the file, key or flag and what is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = {
    "float32": torch.float32, "f32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class ConfigError(ValueError):
    """A checkpoint or option is wrong in a way the user can fix; the message says where and how."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"dtype must be one of {sorted(set(DTYPES))}, got {name!r}") from None


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # one divisor per frequency of the base rule (GGUF files of Llama-3 models store these as a tensor)
    freq_factors: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str  # family key: llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    rope: RopeConfig
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_pretrained(cls, path: str | Path, max_model_len: int | None = None) -> ModelConfig:
        """From a Hugging Face folder (config.json) or a GGUF file (or a folder holding one)."""
        from tokenforge.models.gguf import find_gguf, gguf_model_config

        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return gguf_model_config(path, gguf_file, max_model_len)
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ConfigError(f"model path {str(path)!r} is not a directory")
        if not cfg_file.is_file():
            raise ConfigError(f"{cfg_file} not found: a Hugging Face checkpoint folder needs config.json "
                              "(or pass a GGUF file)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls.from_dict(raw, str(path), cfg_file, max_model_len)

    @classmethod
    def from_dict(cls, raw: dict, path: str, source: Path | str = "config.json",
                  max_model_len: int | None = None) -> ModelConfig:
        raw = {**raw.get("text_config", {}), **raw} if "text_config" in raw else raw
        archs = raw.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise ConfigError(f"{source}: key 'architectures' is {archs!r}; supported: "
                              f"{sorted(SUPPORTED_ARCHITECTURES)}")

        def need(key: str, kind=int):
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            value = raw[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ConfigError(f"{source}: key {key!r} should be {kind.__name__}, got {value!r}")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        if raw.get("head_dim") is None and hidden % heads:
            raise ConfigError(f"{source}: hidden_size ({hidden}) is not divisible by "
                              f"num_attention_heads ({heads}) and no head_dim is given")
        ctx = raw.get("max_position_embeddings") or 2048
        if max_model_len is not None:
            if max_model_len < 1:
                raise ConfigError(f"max_model_len must be >= 1, got {max_model_len}")
            ctx = max_model_len
        window = raw.get("sliding_window")
        if family == "qwen2" or family == "qwen3":
            window = window if raw.get("use_sliding_window") else None
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            path=path, architecture=family, vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), max_model_len=ctx,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=_parse_rope(raw, source),
            qkv_bias=bool(raw.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3", sliding_window=window, eos_token_ids=eos_ids,
        )


def _parse_rope(raw: dict, source) -> RopeConfig:
    """Read RoPE settings as written by transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters)."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = dict(params or raw.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in scaling:
        raise ConfigError(f"{source}: rope scaling of type {kind!r} needs a 'factor'")
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind=kind, factor=float(scaling["factor"]))
    return RopeConfig(
        theta=float(theta), kind=kind, factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def parse_size(value: int | float | str) -> int:
    """'2GiB', '512MiB', '1.5G' or a byte count -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise ConfigError(f"cannot read {value!r} as a size; use e.g. '2GiB', '512MiB' or bytes") from None


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the whole KV pool
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # overrides kv_cache_memory (tests force tiny pools with it)
    dtype: str = "auto"  # KV_CACHE_DTYPES: auto keeps bf16 for bf16 weights and float32 otherwise

    def __post_init__(self):
        if self.dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")


LOAD_POLICIES = ("auto", "always")


@dataclass(frozen=True)
class TierConfig:
    """KV tiers under the block pool: host memory (L2) and a disk folder (L3). See `kv/tiers.py`."""

    offload_memory: int = 0  # bytes of host memory for L2 (0: no tiers)
    disk_dir: str | None = None  # L3's folder (None: no disk tier)
    disk_size: int = 50 << 30  # bytes of block files at most in L3
    write_through: bool = False  # save every full block to L2 at once, not only when L1 evicts it
    tenant_quota: int | None = None  # bytes per owner (tenant) in each of L2 and L3; None: no limit
    tenant_quotas: tuple[tuple[str, int], ...] = ()  # (tenant salt, bytes): overrides tenant_quota
    load_policy: str = "auto"  # auto: load only where cheaper than recomputing; always: load every hit

    def __post_init__(self):
        if self.offload_memory < 0 or self.disk_size < 0:
            raise ConfigError("--kv-offload-memory and --kv-disk-size must be >= 0")
        if self.disk_dir is not None and self.offload_memory == 0:
            raise ConfigError("the disk tier sits under host memory: --kv-disk-dir needs --kv-offload-memory too")
        if self.write_through and self.offload_memory == 0:
            raise ConfigError("--kv-write-through needs --kv-offload-memory")
        if self.tenant_quota is not None and self.tenant_quota < 0:
            raise ConfigError(f"--kv-tenant-quota must be >= 0, got {self.tenant_quota}")
        if self.load_policy not in LOAD_POLICIES:
            raise ConfigError(f"kv load policy must be one of {LOAD_POLICIES}, got {self.load_policy!r}")

    @property
    def enabled(self) -> bool:
        return self.offload_memory > 0


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill)
    max_num_seqs: int = 64

    def __post_init__(self):
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


# the built-in demo model (`--model demo`) and the draft model distilled from it
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_DRAFT_MODEL_DIR = Path(__file__).resolve().parent / "demo_draft_model"

# ngram: prompt lookup; draft: a separate small model sharing the tokenizer; self: a quantized weight-only copy
# of the target, made at load time (self-speculation)
SPEC_METHODS = ("ngram", "draft", "self")
# how the "self" method's copy keeps its weights: per-row int8, or ggml's Q8_0 / Q4_0 blocks
DRAFT_QUANTIZATIONS = ("int8", "q8_0", "q4_0")
# The longest draft verified in one step: with the request's known token it makes 8 query rows, what the
# paged attention kernel serves in one pass (attention/cpu.py: DECODE_MAX_QUERY).
MAX_DRAFT_TOKENS = 7


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft-then-verify decoding. The proposer drafts up to `num_speculative_tokens` per decoding request;
    the target verifies them in the step's one forward pass."""

    method: str = "ngram"
    num_speculative_tokens: int = 5  # the most drafted per request and step (<= MAX_DRAFT_TOKENS)
    adaptive: bool = True  # grow or shrink each request's draft length with its recent acceptance
    tree: bool = False  # draft a tree of alternatives (verified with a tree attention mask) instead of a chain
    tree_width: int = 3  # children per tree node at most
    ngram_min: int = 1  # prompt lookup matches the longest suffix n-gram with ngram_min <= n <= ngram_max
    ngram_max: int = 4
    # Verification is nearly free only while the batch is small: with this many requests decoding, stop
    # drafting; below it, keep the step's query tokens (decodes plus drafts) under max_batch_tokens.
    disable_batch_size: int = 8
    max_batch_tokens: int = 32
    draft_model: str | None = None  # checkpoint folder of the "draft" method's model
    # model drafts stop at the first token the draft gives less than this probability
    draft_confidence: float = 0.3
    draft_quantization: str = "int8"  # the "self" method's copy: one of DRAFT_QUANTIZATIONS

    def __post_init__(self):
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative method must be one of {SPEC_METHODS}, got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= MAX_DRAFT_TOKENS:
            raise ConfigError(f"num_speculative_tokens must be in [1, {MAX_DRAFT_TOKENS}], got "
                              f"{self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.tree_width < 1:
            raise ConfigError(f"tree_width must be >= 1, got {self.tree_width}")
        if self.disable_batch_size < 1 or self.max_batch_tokens < 2:
            raise ConfigError("disable_batch_size must be >= 1 and max_batch_tokens >= 2")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ConfigError(f"draft_confidence must be in [0, 1), got {self.draft_confidence}")
        if self.draft_quantization not in DRAFT_QUANTIZATIONS:
            raise ConfigError(f"draft_quantization must be one of {DRAFT_QUANTIZATIONS}, got "
                              f"{self.draft_quantization!r}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ConfigError("the 'draft' method needs draft_model (a checkpoint folder), and only it takes one")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    dtype: torch.dtype = torch.float32
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None
    seed: int = 0
    speculative: SpeculativeConfig | None = None
    tiers: TierConfig = field(default_factory=TierConfig)
    # how dense weights are kept: "none" (the checkpoint's dtype) or "int8" (per-row, made at load time);
    # weights a file stores quantized (GGUF) keep their own format either way
    quantization: str = "none"
    # activations of block-quantized (GGUF) matmuls: "int8" (fast, as llama.cpp) or "f32" (exact)
    quant_activations: str = "int8"
    step_log_dir: str | None = None  # each step's shape and time as JSON lines here (engine/step_log.py)
