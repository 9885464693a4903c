"""Architecture family -> model class, and the one entry point that builds a model from a weight source."""

from __future__ import annotations

import torch

from tokenforge.config import ModelConfig
from tokenforge.layers.factory import LinearFactory
from tokenforge.models.llama import LlamaForCausalLM
from tokenforge.models.weights import WeightSource, open_weights
from tokenforge.platform import Platform, current_platform

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def load_model(cfg: ModelConfig, dtype: torch.dtype, quantization: str = "none",
               source: WeightSource | None = None, platform: Platform | None = None,
               quant_activations: str = "int8") -> torch.nn.Module:
    """The model for `cfg`, its weights read from `source` (default: the checkpoint at cfg.path), its layers
    and attention as the platform (default: the current one) provides them."""
    platform = platform or current_platform()
    make = LinearFactory(source or open_weights(cfg.path), dtype, quantization, platform.linear_methods(),
                         quant_activations)
    return MODEL_CLASSES[cfg.architecture](cfg, make, platform.attention_backend()).eval()
