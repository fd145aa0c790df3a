"""Synthesizer attention, ORA's baselines, through Transformers' attention interface."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, outputs, tiny_model
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, StaticCache

from poet_peft.synthesizer import SynthesizedLogits, install_synthesizer, synthesizer_attention

F64 = torch.float64


class FakeAttention(torch.nn.Module):
    """What the attention function needs of an attention module: its synthesizer."""

    def __init__(self, synthesizer: SynthesizedLogits):
        super().__init__()
        self.synthesizer = synthesizer


@pytest.mark.parametrize("factor_dim", [None, 3])
def test_attention_is_softmax_of_the_causally_masked_logits_times_v(factor_dim):
    generator = torch.Generator().manual_seed(0)
    module = FakeAttention(SynthesizedLogits(4, 10, factor_dim, generator)).double().eval()
    value = torch.randn(2, 2, 6, 5, generator=generator, dtype=F64)  # 2 key/value heads shared by 4 query heads
    query = torch.randn(2, 4, 6, 5, dtype=F64)
    causal = torch.full((6, 6), torch.finfo(F64).min, dtype=F64).triu(1).expand(2, 1, 6, 6)
    output, weights = synthesizer_attention(module, query, query, value, causal)

    synth = module.synthesizer
    logits = synth.logits if factor_dim is None else synth.left @ synth.right.transpose(-1, -2)
    logits = logits[:, :6, :6].detach().masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected_weights = torch.softmax(logits, dim=-1)
    expected = torch.einsum("hqk,bhkd->bqhd", expected_weights, value.repeat_interleave(2, dim=1))
    assert torch.allclose(weights, expected_weights.expand(2, 4, 6, 6), rtol=0, atol=1e-12)
    assert torch.allclose(output, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["synthesizer_random", "synthesizer_factorized"])
@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_a_future_token_cannot_change_a_past_output(kind, architecture, tokens):
    model = install_synthesizer(tiny_model(architecture), kind, max_length=16)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    with torch.no_grad():
        before, after = outputs(model, tokens), outputs(model, changed)
    assert torch.equal(before[:, :8], after[:, :8])
    assert not torch.allclose(before[:, 8:], after[:, 8:])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["synthesizer_random", "synthesizer_factorized"])
def test_decoding_with_a_cache_gives_the_full_forward_logits(cache, kind, tokens):
    # A static cache has more key slots than tokens: the query rows must follow the positions, not the slot count.
    model = install_synthesizer(tiny_model("llama"), kind, max_length=16)
    with torch.no_grad():
        expected = outputs(model, tokens)
        past = DynamicCache(config=model.config) if cache == "dynamic" else StaticCache(model.config, max_cache_len=16)
        prompt = model(input_ids=tokens[:, :5], past_key_values=past, use_cache=True)
        steps = [prompt.logits]
        for position in range(5, tokens.shape[1]):
            steps.append(model(input_ids=tokens[:, position : position + 1], past_key_values=past).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_q_and_k_are_removed_and_the_logits_learn_or_stay_fixed(tokens):
    model = install_synthesizer(tiny_model("llama"), "synthesizer_random", max_length=16)
    names = [name for name, _ in model.named_parameters()]
    assert not any("q_proj" in name or "k_proj" in name for name in names)
    assert sum("synthesizer.logits" in name for name in names) == 2
    outputs(model, tokens).square().mean().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())

    fixed = install_synthesizer(tiny_model("llama"), "synthesizer_factorized", max_length=16, fixed=True)
    synthesized = [param for name, param in fixed.named_parameters() if "synthesizer" in name]
    assert [tuple(param.shape) for param in synthesized] == [(4, 16, 16)] * 4  # R1, R2 per layer, k=16
    assert not any(param.requires_grad for param in synthesized)


@pytest.mark.parametrize("kind", ["synthesizer_random", "synthesizer_factorized"])
def test_packed_sequences_attend_as_if_each_ran_alone(kind):
    # Transformers masks packed sequences (restarting position_ids) block-diagonally; the logits must restart too.
    model = install_synthesizer(tiny_model("llama"), kind, max_length=16)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[*range(5), *range(6)]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([outputs(model, ids[:, :5]), outputs(model, ids[:, 5:])], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_qk_norms_go_with_q_and_k_so_that_every_parameter_still_trains(tokens):
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        num_key_value_heads=2,
    )
    model = install_synthesizer(Qwen3ForCausalLM(config), "synthesizer_factorized", max_length=16)
    assert not any("_norm" in name and "self_attn" in name for name, _ in model.named_parameters())
    outputs(model, tokens).square().mean().backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())


def test_bad_use_is_refused_with_a_clear_error(tokens):
    with pytest.raises(ValueError, match="valid: 'synthesizer_random', 'synthesizer_factorized'"):
        install_synthesizer(tiny_model("llama"), "synthesizer_dense", max_length=16)
    with pytest.raises(ValueError, match="no attention layer with separate q_proj and k_proj"):
        install_synthesizer(tiny_model("gpt2"), "synthesizer_random", max_length=16)
    model = install_synthesizer(tiny_model("llama"), "synthesizer_random", max_length=8)
    with pytest.raises(ValueError, match="at most 8 tokens and got 12"):
        outputs(model, tokens)
