"""Synthesizer attention (Tay et al. 2021), ORA's baselines, plugged in through Transformers' attention interface.

`install_synthesizer(model, "synthesizer_random", max_length)` gives every attention layer per-head logits that
do not depend on the input: a full N×N matrix ('synthesizer_random') or a rank-k product R1·R2ᵀ
('synthesizer_factorized'), learned or, with fixed=True, frozen. Q and K are removed; V, O and everything else
stay. No model file is forked: the attention function and its mask are registered with Transformers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .ops.seeding import seeded_generator

SYNTHESIZERS = ("synthesizer_random", "synthesizer_factorized")


class SynthesizedLogits(nn.Module):
    """Per-head attention logits over positions: a learned (heads, N, N) matrix, or R1·R2ᵀ with R1, R2 (heads, N, k)."""

    def __init__(self, heads: int, max_length: int, factor_dim: Optional[int], generator: torch.Generator):
        super().__init__()
        self.max_length = max_length
        if factor_dim is None:
            self.logits = nn.Parameter(torch.randn(heads, max_length, max_length, generator=generator))
        else:
            # Entries of R1·R2ᵀ then have unit variance, like the full matrix's.
            scale = factor_dim**-0.25
            self.left = nn.Parameter(torch.randn(heads, max_length, factor_dim, generator=generator) * scale)
            self.right = nn.Parameter(torch.randn(heads, max_length, factor_dim, generator=generator) * scale)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Logits between queries and keys at positions (batch or 1, q) and (batch or 1, k): (batch, heads, q, k)."""
        if hasattr(self, "logits"):
            logits = self.logits[:, query_positions[:, :, None], key_positions[:, None, :]]
        else:
            logits = self.left[:, query_positions] @ self.right[:, key_positions].transpose(-1, -2)
        return logits.transpose(0, 1)


def synthesizer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention function: softmax(synthesized logits + mask)·V; query and key are ignored.

    Rows and columns follow `position_ids`, so packed sequences restart at row 0. With a cache, the keys are its
    slots and slot j is taken to be position j: right for dynamic and static caches on unpadded or right-padded
    batches, not for left-padded ones.
    """
    heads, query_length, key_length = query.shape[1], query.shape[2], value.shape[2]
    max_length = module.synthesizer.max_length
    if key_length > max_length:  # a static size: checking it costs no device sync
        raise ValueError(
            f"Synthesizer attention was built for sequences of at most {max_length} tokens and got {key_length}; "
            "install it with a larger max_length."
        )
    positions = kwargs.get("position_ids")
    slots = torch.arange(key_length, device=value.device)[None]
    if positions is None:
        positions = slots[:, key_length - query_length :]
    key_positions = positions if query_length == key_length else slots  # no cache: the keys are these tokens
    precision = torch.promote_types(value.dtype, torch.float32)  # softmax at least in fp32, as eager attention does
    logits = module.synthesizer(positions, key_positions).to(precision)
    if attention_mask is not None:  # the additive causal (and padding) mask from eager_mask
        logits = logits + attention_mask[:, :, :, :key_length].to(precision)
    weights = torch.softmax(logits, dim=-1).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)  # grouped-query attention shares V heads
    output = (weights @ value).transpose(1, 2).contiguous()
    return output, weights


class SkippedProjection(nn.Module):
    """Stands in for a removed Q or K projection: zeros of the right shape, no parameters, no compute."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A zero tensor (…, out_features) that views and broadcasts like a projection's output."""
        return x.new_zeros(()).expand(*x.shape[:-1], self.out_features)


def install_synthesizer(
    model: nn.Module, kind: str, max_length: int, fixed: bool = False, factor_dim: int = 16, seed: int = 0
) -> nn.Module:
    """Turn every q_proj/k_proj attention layer of a Transformers model into Synthesizer attention, in place."""
    if kind not in SYNTHESIZERS:
        raise ValueError(f"Unknown Synthesizer {kind!r}; valid: {', '.join(map(repr, SYNTHESIZERS))}.")
    attention_layers = [
        (name, module)
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, projection, None), nn.Linear) for projection in ("q_proj", "k_proj"))
    ]
    if not attention_layers:
        raise ValueError(
            f"install_synthesizer found no attention layer with separate q_proj and k_proj in "
            f"{type(model).__name__}; it supports LLaMA-style attention (llama, mistral, qwen2, …)."
        )
    AttentionInterface.register(kind, synthesizer_attention)
    # The masks that eager attention gets: additive, causal, padding included.
    AttentionMaskInterface.register(kind, eager_mask)
    heads = model.config.num_attention_heads
    for name, module in attention_layers:
        module.q_proj = SkippedProjection(module.q_proj.out_features)
        module.k_proj = SkippedProjection(module.k_proj.out_features)
        for norm in ("q_norm", "k_norm"):  # Qwen3's and Gemma3's per-head Q/K norms: nothing left to normalise
            if hasattr(module, norm):
                setattr(module, norm, nn.Identity())
        generator = seeded_generator(seed, name, kind)
        rank = factor_dim if kind == "synthesizer_factorized" else None
        device = module.v_proj.weight.device
        module.synthesizer = SynthesizedLogits(heads, max_length, rank, generator).to(device).requires_grad_(not fixed)
    model.set_attn_implementation(kind)
    return model
