"""Where a model's tensors come from: the `WeightSource` contract and the Hugging Face safetensors folder.

A model asks a source for tensors by their Hugging Face name (`model.layers.0.self_attn.q_proj.weight`),
whatever the file calls them. A source hands out a tensor either as a dense torch tensor, converted to the
dtype asked for, or as it is stored (`stored`): dense in the checkpoint's own dtype, or as quantized blocks
(`QuantizedTensor`) that a quantized linear layer computes with directly. Which of the two a layer takes
is the linear factory's choice (`layers/linear.py`), so the model class never knows the storage.

Every problem is a ConfigError naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from tokenforge.config import ConfigError


@dataclass(frozen=True)
class QuantizedTensor:
    """A 2-D weight [rows, cols] kept in a block-quantized format, e.g. one of ggml's.

    `data` holds the raw blocks, one row after the other (uint8 [rows, bytes_per_row]); `qtype` names the
    format (lower case: "q8_0", "q4_0", "q4_1", "q4_k", "q6_k").
    """

    qtype: str
    data: torch.Tensor
    shape: tuple[int, int]


StoredTensor = torch.Tensor | QuantizedTensor


class WeightSource(Protocol):
    """Named tensors of one checkpoint, by Hugging Face name."""

    path: str

    def has(self, name: str) -> bool:
        ...

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A dense tensor of this shape in `dtype` (dequantized if stored quantized)."""
        ...

    def stored(self, name: str, shape: tuple[int, ...]) -> StoredTensor:
        """The tensor as stored: dense in the checkpoint's dtype, or quantized blocks."""
        ...

    def fingerprint(self) -> str:
        """A stable content digest of the weights (same files, same digest, in every process): it namespaces
        KV-cache keys that leave the process, so one model's cached blocks never serve another's."""
        ...


def check_shape(file: Path | str, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ConfigError(f"{file}: tensor {name!r} has shape {tuple(got)}, but the model's config implies "
                          f"{tuple(want)}")


def sample_digest(files: list[Path], extra: bytes = b"", samples: int = 16, chunk: int = 1 << 16) -> str:
    """sha256 over each file's size and `samples` evenly spaced chunks of it (plus `extra`): reads ~1 MB per
    file instead of all of it, yet two fine-tunes of one shape differ in almost every chunk."""
    digest = hashlib.sha256(extra)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(samples):
                f.seek(max(0, (size - chunk) * i // max(1, samples - 1)))
                digest.update(f.read(chunk))
    return digest.hexdigest()


class SafetensorsSource:
    """A Hugging Face folder: safetensors shards with or without an index."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._dir = Path(path)
        self._handles: dict[Path, object] = {}
        self._where = self._index()
        self._fingerprint: str | None = None

    def _index(self) -> dict[str, Path]:
        index = self._dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{index}: cannot read its 'weight_map' ({e})") from None
            where = {name: self._dir / shard for name, shard in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise ConfigError(f"{index} names shard {shard.name!r}, which is missing from {self._dir}")
            return where
        files = sorted(self._dir.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors weights in {self._dir} (pytorch_model.bin is not supported)")
        where = {}
        for file in files:
            for name in self._open(file).keys():
                where[name] = file
        return where

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"{file}: not a readable safetensors file ({e})") from None
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._where

    def stored(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._where:
            raise ConfigError(f"{self._dir}: tensor {name!r} is missing from the checkpoint")
        file = self._where[name]
        try:
            tensor = self._open(file).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{file}: cannot read tensor {name!r} ({e})") from None
        check_shape(file, name, tuple(tensor.shape), shape)
        return tensor

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.stored(name, shape).to(dtype)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            config = self._dir / "config.json"
            extra = config.read_bytes() if config.is_file() else b""
            self._fingerprint = sample_digest(sorted(set(self._where.values())), extra)
        return self._fingerprint


def open_weights(path: str | Path) -> WeightSource:
    """The weight source for a checkpoint path: a GGUF file (or a folder holding one) or a safetensors folder."""
    from tokenforge.models.gguf import GGUFSource, find_gguf

    gguf_file = find_gguf(path)
    return SafetensorsSource(path) if gguf_file is None else GGUFSource(gguf_file)
