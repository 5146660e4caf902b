"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) as one lean module.

Why not transformers' modules: for small models a pass is dominated by Python and per-op overhead
(config lookups, mask building, cache objects, hooks), and the engine wants a pass it can capture
as a CUDA graph or compile with ``torch.compile(fullgraph=True)``. So the forward here is only
tensor operations, with no host syncs and no branch on data:

- q, k and v come from one fused projection, gate and up from another (fused at load);
- RoPE is gathered from a precomputed table (``rope.py``) once per pass, shared by all layers,
  and rotates q and k together: they are adjacent heads of the fused projection's output;
- every RMSNorm is ``F.rms_norm`` (float32 inside, cast back) followed by the weight multiply at
  the activations' dtype: bit-identical to transformers' ``LlamaRMSNorm`` in float32, bfloat16 and
  float16, where ``F.rms_norm``'s own weight argument would multiply before the cast;
- the caller's ``Attend`` owns the KV cache and the mask; the model never sees either.

Weights are created uninitialised: ``load.load_native`` fills them from a checkpoint.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hedgerow.server.models.native.config import NativeConfig
from hedgerow.server.models.native.rope import rope_table, rotate


class Attend(Protocol):
    """Attention over the caller's KV cache, for one layer's new tokens.

    q [B, N, Hq, D], k and v [B, N, Hkv, D] (RoPE and q/k-norm applied; views, possibly
    non-contiguous). The implementation writes k and v into its cache, attends over the cached rows
    under its own mask with softmax scale ``head_dim ** -0.5`` and returns [B, N, Hq, D].
    """

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def _weight(*shape: int, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, cast back, then scale."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight


class DecoderLayer(nn.Module):
    def __init__(self, config: NativeConfig, index: int, device, dtype):
        super().__init__()
        c = config
        w = dict(device=device, dtype=dtype)
        self.index = index
        self.eps = c.rms_norm_eps
        self.num_heads = c.num_heads
        self.num_qk_heads = c.num_heads + c.num_kv_heads
        self.head_dim = c.head_dim
        qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.attn_norm = _weight(c.hidden_size, **w)
        self.qkv_weight = _weight(qkv_rows, c.hidden_size, **w)  # rows: q | k | v
        self.qkv_bias = _weight(qkv_rows, **w) if c.qkv_bias else None
        # Qwen3's q_norm and k_norm weights repeated per head: [Hq + Hkv, D], one multiply for both
        self.qk_norm = _weight(self.num_qk_heads, c.head_dim, **w) if c.qk_norm else None
        self.o_weight = _weight(c.hidden_size, c.num_heads * c.head_dim, **w)
        self.o_bias = _weight(c.hidden_size, **w) if c.o_bias else None
        self.mlp_norm = _weight(c.hidden_size, **w)
        self.gate_up_weight = _weight(2 * c.intermediate_size, c.hidden_size, **w)  # rows: gate | up
        self.gate_up_bias = _weight(2 * c.intermediate_size, **w) if c.mlp_bias else None
        self.down_weight = _weight(c.hidden_size, c.intermediate_size, **w)
        self.down_bias = _weight(c.hidden_size, **w) if c.mlp_bias else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """h [B, N, hidden] -> [B, N, hidden]; cos / sin [B, N, 1, D]."""
        x = _norm(h, self.attn_norm, self.eps)
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).unflatten(-1, (-1, self.head_dim))  # [B, N, Hq+2Hkv, D]
        qk = qkv[:, :, : self.num_qk_heads]  # [B, N, Hq+Hkv, D]
        if self.qk_norm is not None:
            qk = _norm(qk, self.qk_norm, self.eps)
        qk = rotate(qk, cos, sin)
        out = attend(self.index, qk[:, :, : self.num_heads], qk[:, :, self.num_heads :], qkv[:, :, self.num_qk_heads :])
        h = h + F.linear(out.flatten(-2), self.o_weight, self.o_bias)  # out [B, N, Hq, D]
        x = _norm(h, self.mlp_norm, self.eps)
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)  # [B, N, I] each
        return h + F.linear(F.silu(gate) * up, self.down_weight, self.down_bias)


class NativeCausalLM(nn.Module):
    """A decoder-only causal LM of the Llama family; ``forward`` gives final-normed hidden states,
    ``logits`` the output head where the caller wants it."""

    impl = "native"

    def __init__(self, config: NativeConfig, max_positions: int, device=None, dtype=None):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        w = dict(device=device, dtype=dtype)
        self.config = config
        self.max_positions = max_positions
        self.embed = _weight(config.vocab_size, config.hidden_size, **w)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        self.norm = _weight(config.hidden_size, **w)
        self.lm_head = self.embed if config.tie_word_embeddings else _weight(config.vocab_size, config.hidden_size, **w)
        # [max_positions, 2D]: cos | signed sin, computed in float32, kept at the activations' dtype
        self.register_buffer("rope", rope_table(config, max_positions).to(**w), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """tokens, positions [B, N] int64 (positions < max_positions) -> hidden [B, N, hidden]."""
        h = F.embedding(tokens, self.embed)  # [B, N, hidden]
        rope = F.embedding(positions, self.rope)[:, :, None]  # [B, N, 1, 2D]
        d = self.config.head_dim
        cos, sin = rope[..., :d], rope[..., d:]  # [B, N, 1, D] each
        for layer in self.layers:
            h = layer(h, cos, sin, attend)
        return _norm(h, self.norm, self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        return F.linear(hidden, self.lm_head).float()
