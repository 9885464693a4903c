"""Architecture family -> model class, and the one entry point that builds a model from a checkpoint folder."""

from __future__ import annotations

import torch

from tokenforge.config import ModelConfig
from tokenforge.models.llama import LlamaForCausalLM
from tokenforge.models.loader import CheckpointReader

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def load_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    model = MODEL_CLASSES[cfg.architecture](cfg, CheckpointReader(cfg.path), dtype)
    return model.eval()
