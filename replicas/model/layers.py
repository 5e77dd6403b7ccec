"""Llama-family decoder layers: RMSNorm, rotary embeddings, GQA projections, SwiGLU.

Parameter names follow Hugging Face's Llama (`model.layers.0.self_attn.q_proj.weight`,
...), so a checkpoint's state dict loads as is. Attention itself is a strategy
passed to `forward` (`Attend`): paged over the block manager's memory when
serving, dense over the whole sequence as the reference, with the same weights.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvroute.replicas.model.config import Llama3Rope, ModelArch


class Attend(Protocol):
    """Attention of `layer` for queries q [T, heads, d] and this step's keys and
    values k, v [T, kv_heads, d] (rotary applied); returns [T, heads, d]."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, then scale in the model's
        # dtype, as Hugging Face does (one fused op for the normalisation).
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embeddings (rotate-half layout), cached up to max_model_len;
    frequencies scaled as Llama 3 does when `scaling` is set."""

    def __init__(
        self, head_dim: int, max_len: int, theta: float, scaling: Llama3Rope | None = None
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if scaling is not None:
            inv_freq = scaling.scale(inv_freq)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """cos and sin [T, 1, d] of `positions` [T], once per step for every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        half = sin.shape[-1] // 2
        return RotaryAngles(cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))


class RotaryAngles(NamedTuple):
    """cos, and sin with its first half negated: rotate-half(x) * sin equals
    x rolled by half * this, one op fewer per rotation."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, d] rotated to the angles' positions."""
        return x * self.cos + x.roll(x.shape[-1] // 2, -1) * self.signed_sin


def _pack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for projections of the same input, so they run as one
    matmul; each projection's parameters become views of it (the same values and
    memory, and the state dict keeps Hugging Face's names)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias.detach() for m in linears if m.bias is not None]
    bias = torch.cat(biases) if biases else None
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
    return weight, bias


class _Unpacked(RuntimeError):
    def __init__(self) -> None:
        super().__init__("CausalLM.pack() must run after the weights are loaded and placed")


class SelfAttention(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        h, d, kvh = arch.hidden_size, arch.head_dim, arch.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, kvh, d
        self.q_proj = nn.Linear(h, arch.num_heads * d, bias=arch.attention_bias)
        self.k_proj = nn.Linear(h, kvh * d, bias=arch.attention_bias)
        self.v_proj = nn.Linear(h, kvh * d, bias=arch.attention_bias)
        self.o_proj = nn.Linear(arch.num_heads * d, h, bias=False)
        self.sizes = [arch.num_heads * d, kvh * d, kvh * d]
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pack(self) -> None:
        self.qkv = _pack([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        angles: RotaryAngles,
        attend: Attend,
    ) -> torch.Tensor:
        if self.qkv is None:
            raise _Unpacked
        t = x.shape[0]
        q, k, v = F.linear(x, *self.qkv).split(self.sizes, dim=-1)
        q = angles.rotate(q.reshape(t, self.num_heads, self.head_dim))
        k = angles.rotate(k.reshape(t, self.num_kv_heads, self.head_dim))
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        return self.o_proj(attend(layer, q, k, v).reshape(t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None

    def pack(self) -> None:
        self.gate_up = _pack([self.gate_proj, self.up_proj])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            raise _Unpacked
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = SelfAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch.hidden_size, arch.intermediate_size)


class Decoder(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder and its LM head, over a flat batch of tokens from many requests."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = Decoder(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(arch.head_dim, arch.max_model_len, arch.rope_theta, arch.rope_scaling)

    def pack(self) -> None:
        """Run q/k/v and gate/up as one matmul each. Call once the weights are
        loaded and on their device and dtype (a later `.to()` copies them apart)."""
        for layer in self.model.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        if not self.arch.tie_word_embeddings:
            # The LM head stored transposed (the parameter a view of it): the
            # few rows of a decode step multiply ~1.3x (batch 8) to 3x (batch 1)
            # faster against a contiguous W^T; prefill is unchanged.
            weight = self.lm_head.weight.detach()
            self.lm_head.weight = nn.Parameter(weight.t().contiguous().t(), requires_grad=False)

    def init_random(self, seed: int) -> None:
        """Seeded weights whose logits spread out (std 1/sqrt(fan_in)), so greedy
        choices are not near-ties that float rounding could flip."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    std = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5
                    param.copy_(torch.randn(param.shape, generator=gen) * std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] (every token when None) of a flat
        batch: token ids and their positions [T]."""
        x = self.model.embed_tokens(input_ids)
        angles = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(i, layer.input_layernorm(x), angles, attend)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(self.model.norm(x)).float()
