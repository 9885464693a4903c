"""GGUF files (llama.cpp's one-file checkpoints): finding one, reading its metadata and tensor table with
the `gguf` package, and turning the metadata into the Hugging Face-style config `ModelConfig` reads.

`gguf.GGUFReader` reads arrays one element at a time (two numpy views per string or number: seconds for a
50k-token vocabulary's tokens, scores and types), so `_Reader` reads arrays of numbers in one view and
arrays of strings with one scan of their lengths; the result is the stock reader's fields. The config,
the tokenizer and the weights each need the metadata, so it is memoized per file (path, size and
modification time); the reader and its memory map are dropped once parsed. Every problem is a
ConfigError naming the file and the field or tensor.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tokenforge.config import ConfigError

# GGUF architecture -> the Hugging Face class of the same family (Mistral-style models come as "llama")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as the file calls it: blk.0.attn_q.weight
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: [rows, cols] for a matrix
    offset: int  # absolute byte offset in the file
    num_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, object]  # key -> int | float | bool | str | list
    tensors: dict[str, TensorInfo]

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def need(self, key: str, kind: type = int):
        if key not in self.metadata:
            raise ConfigError(f"{self.path}: required field {key!r} is missing")
        value = self.metadata[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.path}: field {key!r} should be {kind.__name__}, got {value!r}")
        return value

    @property
    def architecture(self) -> str:
        arch = self.need("general.architecture", str)
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{self.path}: field 'general.architecture' is {arch!r}; supported: "
                              f"{sorted(ARCHITECTURES)}")
        return arch


class _Reader(gguf.GGUFReader):
    """The gguf package's reader with arrays of numbers and of strings read in bulk (little-endian files)."""

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, n, offs = int(raw_itype[0]), int(count[0]), orig_offs + 12
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(itype)]
        nptype = self.gguf_scalar_to_np.get(types[1])
        if nptype is not None:  # one view holds every element; contents() lists it
            values = self._get(offs, nptype, n)
            return 12 + int(values.nbytes), [raw_itype, count, values], [2], types
        if types[1] != gguf.GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        raw, buf = self.data.view(np.ndarray), self.data.data
        parts = [raw_itype, count]
        for _ in range(n):
            (length,) = struct.unpack_from("<Q", buf, offs)
            parts.append(raw[offs + 8:offs + 8 + length])
            offs += 8 + length
        return offs - orig_offs, parts, list(range(2, 2 + n)), types


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one *.gguf in a folder without config.json (a
    Hugging Face folder wins). None when `path` is not GGUF; ConfigError when a folder holds several."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        raise ConfigError(f"{path} holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                          "pass the one to load as --model PATH/NAME.gguf")
    return files[0] if files else None


def read_gguf(path: str | Path) -> GGUFFile:
    """The parsed metadata and tensor table of a GGUF file (memoized while the file is unchanged)."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the GGUF file ({e.strerror})") from None
    return _read(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    try:
        reader = _Reader(path)
        if reader.byte_order != "I":
            raise ConfigError(f"{path}: a big-endian GGUF file; tokenforge reads little-endian ones")
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        tensors = {t.name: TensorInfo(t.name, t.tensor_type, tuple(int(n) for n in reversed(t.shape)),
                                      int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, TypeError, OSError, UnicodeDecodeError, struct.error) as e:
        raise ConfigError(f"{path}: not a readable GGUF file, or a truncated one ({e})") from None
    for info in tensors.values():
        if info.offset + info.num_bytes > size:
            raise ConfigError(f"{path}: tensor {info.name!r} ends at byte {info.offset + info.num_bytes}, past the "
                              f"end of the file ({size} bytes); the file is truncated")
    return GGUFFile(path, metadata, tensors)


def hf_config(file: GGUFFile) -> dict:
    """The file's hyper-parameters as a Hugging Face config.json dict, for ModelConfig.from_dict."""
    arch = file.architecture
    key = lambda name: f"{arch}.{name}"
    heads = file.need(key("attention.head_count"))
    hidden = file.need(key("embedding_length"))
    head_dim = file.get(key("attention.key_length")) or hidden // heads
    rotary_dim = file.get(key("rope.dimension_count"), head_dim)
    if rotary_dim != head_dim:
        raise ConfigError(f"{file.path}: field {key('rope.dimension_count')!r} is {rotary_dim}, but heads are "
                          f"{head_dim} wide; rotary embeddings over part of a head are not supported")
    embed = file.tensors.get("token_embd.weight")
    vocab = file.get(key("vocab_size")) or (embed.shape[0] if embed else None)
    if vocab is None:
        raise ConfigError(f"{file.path}: field {key('vocab_size')!r} and tensor 'token_embd.weight' are missing")
    eos = [file.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    return {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": file.need(key("feed_forward_length")),
        "num_hidden_layers": file.need(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": file.get(key("attention.head_count_kv")) or heads,
        "head_dim": head_dim,
        "rms_norm_eps": _shortest(file.need(key("attention.layer_norm_rms_epsilon"), float)),
        "max_position_embeddings": file.get(key("context_length")) or 2048,
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "attention_bias": "blk.0.attn_q.bias" in file.tensors,
        "rope_theta": _shortest(file.get(key("rope.freq_base"), 10000.0)),
        "rope_scaling": _rope_scaling(file, key),
        "bos_token_id": file.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted({i for i in eos if i is not None}),
    }


def _rope_scaling(file: GGUFFile, key) -> dict | None:
    kind = file.get(key("rope.scaling.type"), "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ConfigError(f"{file.path}: field {key('rope.scaling.type')!r} is {kind!r}; supported: none, linear")
    return {"rope_type": "linear", "factor": _shortest(file.need(key("rope.scaling.factor"), float))}


def _shortest(value: float) -> float:
    """A float32 field as the shortest decimal that reads back as it (1e-06 rather than 9.99999997e-07), the
    value the model's author wrote; computing in float32 rounds both to the same number."""
    return float(str(np.float32(value)))
