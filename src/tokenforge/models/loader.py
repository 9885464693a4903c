"""Reads Hugging Face checkpoint folders: safetensors shards (with or without an index) into named tensors.

Every problem is reported as a ConfigError naming the file and the key, never as a bare stack trace.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tokenforge.config import ConfigError


class CheckpointReader:
    """Looks tensors up by name across shards and converts them to the dtype asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        self._where = self._index()

    def _index(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{index}: cannot read its 'weight_map' ({e})") from None
            where = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise ConfigError(f"{index} names shard {shard.name!r}, which is missing from {self.path}")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors weights in {self.path} (pytorch_model.bin is not supported)")
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

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if name not in self._where:
            raise ConfigError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self._where[name]
        handle = self._open(file)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{file}: cannot read tensor {name!r} ({e})") from None
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json "
                              f"implies {tuple(shape)}")
        return tensor.to(dtype)
