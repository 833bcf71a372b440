"""The CPU engine's packed linears (engine/cpu_linear.py): F.linear's meaning within fp32's error bound,
repacked when a weight changes, and used by the engine only where they apply."""
import copy

import pytest
import torch
import torch.nn.functional as F

import kangaroo_ext as kx
from kangaroo_ext.engine.cpu_linear import PackedLinear, unavailable_reason
from kangaroo_ext.engine.engine import Engine
from kangaroo_ext.engine.spec import model_spec

from models import prompts, tiny_model

needs_onednn = pytest.mark.skipif(bool(unavailable_reason()), reason=unavailable_reason() or "-")


def within_summation_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b=None):
    """|y - exact| <= γ_K · (|x| |w|ᵀ + |b|), the forward error bound of an fp32 dot product of length K
    in any summation order (γ_K = K u / (1 - K u), u = 2^-24): no order may do worse."""
    K = x.shape[-1]
    u = 2.0 ** -24
    gamma = (K + 1) * u / (1 - (K + 1) * u)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = gamma * (F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs()))
    assert ((y.double() - exact).abs() <= bound + 1e-30).all(), float(((y.double() - exact).abs() - bound).max())


@needs_onednn
@pytest.mark.parametrize("rows", [2, 3, 7, 9])
@pytest.mark.parametrize("n,k", [(5, 7), (130, 33), (1536, 576)])
@pytest.mark.parametrize("bias", [False, True])
@torch.inference_mode()
def test_packed_linear_is_f_linear_within_the_fp32_bound(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    with torch.inference_mode(False):  # weights as a model's: ordinary tensors with a version counter
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(1, rows, k, generator=g)
    linear = PackedLinear()
    y = linear(x, w, b)
    assert y.shape == (1, rows, n) and linear.packed_bytes > 0
    within_summation_bound(y, x, w, b)


@needs_onednn
@torch.no_grad()
def test_one_row_and_what_packing_cannot_take_go_to_f_linear():
    linear = PackedLinear()
    w = torch.randn(64, 32)
    x1 = torch.randn(1, 1, 32)
    assert torch.equal(linear(x1, w), F.linear(x1, w)) and linear.packed_bytes == 0
    x_half = torch.randn(3, 32).half()
    assert torch.equal(linear(x_half, w.half()), F.linear(x_half, w.half())) and linear.packed_bytes == 0
    with torch.inference_mode():
        w_inf = torch.randn(64, 32)  # no version counter: a change could not be seen, so never packed
        x = torch.randn(4, 32)
        assert torch.equal(linear(x, w_inf), F.linear(x, w_inf)) and linear.packed_bytes == 0


@needs_onednn
def test_a_weight_changed_in_place_is_packed_again():
    linear = PackedLinear()
    w = torch.randn(48, 16)
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = linear(x, w)
        one_copy = linear.packed_bytes
        w.mul_(-2.0)                          # training steps and load_state_dict change weights in place
        second = linear(x, w)
    within_summation_bound(second, x, w)
    assert not torch.allclose(first, second)
    assert one_copy > 0 and linear.packed_bytes == one_copy, "the old packed copy is dropped, not kept"


@needs_onednn
def test_autograd_through_a_trainable_weight_uses_f_linear():
    linear = PackedLinear()
    w = torch.randn(8, 4, requires_grad=True)
    y = linear(torch.randn(3, 4), w)
    y.sum().backward()
    assert w.grad is not None and linear.packed_bytes == 0


def test_the_engine_says_where_packing_is_off(monkeypatch):
    model = tiny_model("llama")
    assert Engine(model_spec(model)).cpu_packing_off == unavailable_reason()
    monkeypatch.setenv("KANGAROO_DISABLE_CPU_PACKING", "1")
    assert "KANGAROO_DISABLE_CPU_PACKING" in Engine(model_spec(model)).cpu_packing_off
    monkeypatch.delenv("KANGAROO_DISABLE_CPU_PACKING")
    half = copy.deepcopy(tiny_model("llama")).to(torch.bfloat16)  # tiny_model is shared: copy first
    assert "fp32 on the CPU" in Engine(model_spec(half)).cpu_packing_off


def ordinary_copy(model):
    """A copy whose weights are ordinary tensors (tiny_model's may have been made under inference_mode)."""
    with torch.inference_mode(False):
        model = copy.deepcopy(model)
        for param in model.parameters():
            param.data = param.data.clone()
    return model


@needs_onednn
def test_speculative_with_packed_verification_equals_plain_and_transformers():
    """Verify steps (several rows) go through the packed linears, plain steps (one row) do not; the
    tokens still equal plain decoding's and transformers'."""
    model = ordinary_copy(tiny_model("llama"))
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    assert not next(model.parameters()).is_inference() and not next(adapter.parameters()).is_inference()
    with torch.inference_mode():
        _packed_run_equals_plain(model, adapter)


def _packed_run_equals_plain(model, adapter):
    for p in prompts(3, seed=31):
        hf = model.generate(p[None], max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(p[None]))
        plain = kx.generate(model, p, max_new_tokens=40, eos_token_id=[]).sequences
        spec = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=40, threshold=0.0, max_draft=5,
                                       eos_token_id=[], copy_draft=False, draft_gate=False)
        assert torch.equal(plain, hf) and torch.equal(spec.sequences, plain)
        assert spec.stats.mean_accepted > 1.0, "drafts were accepted: verify steps had several rows"
        assert spec.stats.cpu_packing_off == "" and spec.stats.packed_weights_mb > 0


@needs_onednn
def test_inference_mode_weights_are_not_packed_and_stats_say_so():
    with torch.inference_mode():
        model = copy.deepcopy(tiny_model("llama"))
        assert next(model.parameters()).is_inference()
        adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
        p = prompts(1, seed=32)[0]
        plain = kx.generate(model, p, max_new_tokens=12, eos_token_id=[]).sequences
        spec = kx.speculative_generate(model, p, adapter=adapter, max_new_tokens=12, threshold=0.0, max_draft=3,
                                       eos_token_id=[], copy_draft=False)
    assert torch.equal(spec.sequences, plain)
    assert "inference tensor" in spec.stats.cpu_packing_off and spec.stats.packed_weights_mb == 0
