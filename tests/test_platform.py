"""The platform seam: the model's attention and linear layers come from the platform, not from model code."""

import dataclasses

import torch

from tokenforge.attention.cpu import CpuAttention
from tokenforge.config import ModelConfig
from tokenforge.layers.linear import Linear
from tokenforge.models.registry import load_model
from tokenforge.platform import Platform, current_platform
from tokenforge.runner.batch import BatchEntry, prepare_batch
from tokenforge.runner.kv_cache import KVCache


class _TorchOnly(Platform):
    """A platform whose attention never uses the compiled kernel and whose dense linears are marked."""

    def attention_backend(self):
        return CpuAttention(use_kernel=False)

    def linear_methods(self) -> dict:
        class Marked(Linear):
            pass

        return {"none": Marked}


def test_current_platform_is_the_cpu():
    p = current_platform()
    assert p.device == torch.device("cpu") and isinstance(p.attention_backend(), CpuAttention)


def test_the_model_takes_its_backends_from_the_platform(llama_dir):
    cfg = ModelConfig.from_pretrained(llama_dir)
    platform = _TorchOnly(**dataclasses.asdict(current_platform()))
    ours = load_model(cfg, torch.float32, platform=platform)
    layer = ours.layers[0]
    assert type(layer.qkv_proj).__name__ == "Marked" and layer.attention.use_kernel is False
    base = load_model(cfg, torch.float32)
    logits = []
    for model in (ours, base):
        cache = KVCache(cfg, 4, 16, torch.float32)
        entries = [BatchEntry("a", list(range(3, 40)), 0, [0, 1, 2], [], None, True),
                   BatchEntry("b", [5], 0, [3], [], None, True)]
        batch = prepare_batch(entries, model.layers[0].attention, 16, None)
        with torch.inference_mode():
            out = model.compute_logits(model(batch.input_ids, batch.positions, batch.meta, cache.layers))
        # the backends may order the requests differently (the kernel serves longer chunks as paged rows)
        spans, start = {}, 0
        for e in batch.entries:
            spans[e.req_id], start = (start, start + e.num_new_tokens), start + e.num_new_tokens
        logits.append(torch.cat([out[slice(*spans[r])] for r in ("a", "b")]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
