"""The GGUF weight source: a GGUF file's tensors under the Hugging Face names the model asks for, and the
model config its metadata describes.

Tensors are read once, straight from the file into memory the model then owns (no copy of the file stays
mapped), in their stored format: ggml's Q8_0, Q4_0, Q4_1, Q4_K and Q6_K stay quantized blocks
(`QuantizedTensor`, computed with by `layers/quant_linear.py`); F32, F16 and BF16 come back dense; any
other format the `gguf` package can decode is dequantized to float32 at load (said once, in one log line).

llama.cpp's converter reorders the rows of each head of a `llama`-architecture model's Q and K projections
(rotate-half pairs (i, i + d/2) become adjacent rows 2i, 2i + 1, for its interleaved rotary kernel). The
model here uses Hugging Face's rotate-half layout, so those rows are put back. Rows are moved whole, so
quantized rows are moved as bytes, without dequantizing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from tokenforge.config import ConfigError, ModelConfig
from tokenforge.layers.quant_formats import FORMATS, dequantize
from tokenforge.models.gguf_file import GGUFFile, TensorInfo, find_gguf, hf_config, read_gguf
from tokenforge.models.weights import QuantizedTensor, StoredTensor, check_shape, sample_digest

logger = logging.getLogger(__name__)

__all__ = ["GGUFSource", "find_gguf", "gguf_model_config", "gguf_name", "read_tensor", "unpermute_rows"]

Q = gguf.GGMLQuantizationType
NATIVE = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q4_K: "q4_k", Q.Q6_K: "q6_k"}
DENSE = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}

_TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
_IN_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_name(hf_name: str) -> str | None:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (None for names GGUF has no tensor for)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    match = _LAYER_NAME.fullmatch(hf_name)
    if match is None or match[2] not in _IN_LAYER:
        return None
    return f"blk.{match[1]}.{_IN_LAYER[match[2]]}.{match[3]}"


def gguf_model_config(path: str | Path, file: Path, max_model_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a GGUF file (`path` is what the user named: the file or its folder)."""
    parsed = read_gguf(file)
    cfg = ModelConfig.from_dict(hf_config(parsed), str(path), file, max_model_len)
    freqs = parsed.tensors.get("rope_freqs.weight")  # Llama-3-style scaling: one divisor per frequency
    if freqs is not None:
        check_shape(parsed.path, freqs.name, freqs.shape, (cfg.head_dim // 2,))
        if freqs.ggml_type not in DENSE:
            raise ConfigError(f"{parsed.path}: tensor 'rope_freqs.weight' is {freqs.ggml_type.name}; expected F32")
        factors = read_tensor(parsed, freqs).float()
        cfg = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, freq_factors=tuple(factors.tolist())))
    return cfg


def read_tensor(file: GGUFFile, info: TensorInfo) -> StoredTensor:
    """One tensor, read from the file into memory of its own, in its stored format: native ggml blocks as
    QuantizedTensor, F32/F16/BF16 dense, anything else the gguf package decodes as float32."""
    raw = torch.empty(info.num_bytes, dtype=torch.uint8)
    with open(file.path, "rb") as f:
        f.seek(info.offset)
        if f.readinto(raw.numpy()) != info.num_bytes:
            raise ConfigError(f"{file.path}: tensor {info.name!r} is cut short; the file is truncated")
    if info.ggml_type in NATIVE:
        qtype = NATIVE[info.ggml_type]
        rows, cols = info.shape if len(info.shape) == 2 else (1, info.shape[0])
        return QuantizedTensor(qtype, raw.view(rows, FORMATS[qtype].row_bytes(cols)), (rows, cols))
    if info.ggml_type in DENSE:
        return raw.view(DENSE[info.ggml_type]).view(info.shape)
    rows = raw.numpy().reshape(-1, gguf.quant_shape_to_byte_shape(info.shape[-1:], info.ggml_type)[-1])
    return torch.from_numpy(gguf.quants.dequantize(rows, info.ggml_type)).reshape(info.shape)


def unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head of d rows, file row 2i + j holds Hugging Face row
    j * d/2 + i. Works on any tensor whose first dimension is the rows (weights, quantized rows, biases)."""
    d = rows.shape[0] // num_heads
    order = torch.arange(rows.shape[0]).view(num_heads, d // 2, 2).transpose(1, 2).reshape(-1)
    return rows[order]


class GGUFSource:
    """A GGUF file as a WeightSource (see models/weights.py)."""

    def __init__(self, path: str | Path):
        self.file: GGUFFile = read_gguf(path)
        self.path = str(self.file.path)
        arch = self.file.architecture
        self._permuted = arch == "llama"
        self._heads = {"attn_q": self.file.need(f"{arch}.attention.head_count")}
        self._heads["attn_k"] = self.file.get(f"{arch}.attention.head_count_kv") or self._heads["attn_q"]
        # the embedding is asked for twice when the LM head is tied to it: one copy. Nothing else is kept,
        # so a fused layer's parts are freed as soon as they are stacked (and their memory reused).
        self._embedding: StoredTensor | None = None
        self._fingerprint: str | None = None
        self._check_formats()

    def _check_formats(self) -> None:
        decoded = {}
        for info in self.file.tensors.values():
            if info.ggml_type in NATIVE or info.ggml_type in DENSE:
                continue
            if not _decodable(info.ggml_type):
                raise ConfigError(f"{self.path}: tensor {info.name!r} is stored as {info.ggml_type.name}, which "
                                  f"neither tokenforge nor the gguf package can read (tokenforge computes with "
                                  f"{sorted(q.name for q in NATIVE)} and reads {sorted(q.name for q in DENSE)})")
            decoded.setdefault(info.ggml_type.name, []).append(info.name)
        if decoded:
            logger.warning("%s: %d tensors stored as %s are dequantized to float32 at load (tokenforge computes with "
                           "%s directly): %s", self.file.path.name, sum(map(len, decoded.values())),
                           "/".join(sorted(decoded)), "/".join(sorted(q.name for q in NATIVE)),
                           ", ".join(n for names in decoded.values() for n in names))

    def has(self, name: str) -> bool:
        return gguf_name(name) in self.file.tensors

    def _info(self, name: str) -> TensorInfo:
        raw = gguf_name(name)
        if raw not in self.file.tensors:
            where = f"tensor {raw!r}" if raw else "no tensor"
            raise ConfigError(f"{self.path}: {where} for {name!r} in the file")
        return self.file.tensors[raw]

    def stored(self, name: str, shape: tuple[int, ...]) -> StoredTensor:
        info = self._info(name)
        check_shape(self.path, info.name, info.shape, shape)
        if info.name != "token_embd.weight":
            return self._unpermuted(info, read_tensor(self.file, info))
        if self._embedding is None:
            self._embedding = read_tensor(self.file, info)
        return self._embedding

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = self.stored(name, shape)
        if isinstance(tensor, QuantizedTensor):
            return dequantize(tensor.data, tensor.qtype, tensor.shape[1]).reshape(shape).to(dtype)
        return tensor.to(dtype)

    def _unpermuted(self, info: TensorInfo, tensor: StoredTensor) -> StoredTensor:
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else None
        if not self._permuted or kind not in self._heads:
            return tensor
        if isinstance(tensor, QuantizedTensor):
            return QuantizedTensor(tensor.qtype, unpermute_rows(tensor.data, self._heads[kind]), tensor.shape)
        return unpermute_rows(tensor, self._heads[kind])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sample_digest([self.file.path])
        return self._fingerprint


def _decodable(ggml_type: gguf.GGMLQuantizationType) -> bool:
    """Whether the gguf package can dequantize this format (it raises NotImplementedError for some)."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True
