"""The Llama family (Llama incl. Llama-3 RoPE, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norm).

Works on a flattened batch: tokens of every scheduled request in one [num_tokens] vector, with their
positions and the attention metadata that maps them onto the paged KV cache. q/k/v and gate/up projections
are fused at load time so each layer runs four matmuls.
"""

from __future__ import annotations

import torch

from tokenforge.attention import AttentionBackend, AttentionMetadata
from tokenforge.config import ModelConfig
from tokenforge.layers.activation import silu_and_mul
from tokenforge.layers.factory import LinearFactory
from tokenforge.layers.norm import RMSNorm
from tokenforge.layers.rotary import Rotary
from tokenforge.models.fused_decode import FusedDecode


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, make: LinearFactory, attention: AttentionBackend, i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.attention = attention
        h, d, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.scale = d ** -0.5
        qkv = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        self.qkv_proj = make.linear([f"{n}.weight" for n in qkv], [self.q_size, self.kv_size, self.kv_size], h,
                                    [f"{n}.bias" for n in qkv] if cfg.qkv_bias else None)
        self.o_proj = make.linear([f"{p}self_attn.o_proj.weight"], [h], self.q_size)
        self.q_norm = self.k_norm = None
        norm = lambda name, size: RMSNorm(make.source.get(name, (size,), torch.float32), cfg.rms_norm_eps)
        if cfg.qk_norm:
            self.q_norm = norm(f"{p}self_attn.q_norm.weight", d)
            self.k_norm = norm(f"{p}self_attn.k_norm.weight", d)
        self.gate_up_proj = make.linear([f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"], [m, m], h)
        self.down_proj = make.linear([f"{p}mlp.down_proj.weight"], [h], m)
        self.input_norm = norm(f"{p}input_layernorm.weight", h)
        self.post_norm = norm(f"{p}post_attention_layernorm.weight", h)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] is the residual stream; it is updated in place and returned."""
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_norm(x))
        if self.q_norm is not None:
            self._norm_qk_(qkv)
        self.attention.rotate_and_store(qkv, rotary, positions, self.num_heads, self.num_kv_heads, k_cache, v_cache,
                                        meta)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        attn = self.attention.attend(q.view(t, self.num_heads, self.head_dim),
                                     k.view(t, self.num_kv_heads, self.head_dim),
                                     v.view(t, self.num_kv_heads, self.head_dim), k_cache, v_cache, meta, self.scale)
        h = self.post_norm.add_forward(x, self.o_proj(attn.view(t, self.q_size)))
        return x.add_(self.down_proj(silu_and_mul(self.gate_up_proj(h))))

    def _norm_qk_(self, qkv: torch.Tensor) -> None:
        """Qwen3's per-head RMSNorm of q and k, written back into the fused projection."""
        t, d = qkv.shape[0], self.head_dim
        q = qkv[:, :self.q_size].view(t, self.num_heads, d)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.num_kv_heads, d)
        q.copy_(self.q_norm(q))
        k.copy_(self.k_norm(k))


class LlamaForCausalLM(torch.nn.Module):
    """Layers as the factory builds them (dense or quantized weights); activations, norms and logits in
    float32 on the CPU."""

    def __init__(self, cfg: ModelConfig, make: LinearFactory, attention: AttentionBackend):
        super().__init__()
        self.cfg = cfg
        v, h = cfg.vocab_size, cfg.hidden_size
        self.embed = make.embedding("model.embed_tokens.weight", (v, h))
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, make, attention, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(make.source.get("model.norm.weight", (h,), torch.float32), cfg.rms_norm_eps)
        tied = cfg.tie_word_embeddings or not make.source.has("lm_head.weight")
        self.lm_head = make.linear(["model.embed_tokens.weight" if tied else "lm_head.weight"], [v], h)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.max_model_len)
        self.fused = FusedDecode.build(self)  # all layers of a decode step in one compiled call, where it can

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Final-norm hidden states [num_tokens, hidden] for the flattened batch."""
        if positions.numel() and int(positions.max()) >= self.rotary.max_positions:
            raise ValueError(f"position {int(positions.max())} is beyond the model's {self.rotary.max_positions}")
        x = self.embed(input_ids)
        if self.fused is not None and self.fused.run(self, x, positions, meta, kv_caches):
            return self.norm(x)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, positions, self.rotary, meta, k_cache, v_cache)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
