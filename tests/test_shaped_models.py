"""bench/shaped_models.py: the random-weight models issue 21's round_1b is measured on."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import shaped_models  # noqa: E402

import kangaroo_ext as kx  # noqa: E402

TINY = dict(shaped_models.LLAMA_3_2_1B, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)


def test_llama_3_2_1b_has_its_published_parameter_count():
    assert shaped_models.parameter_count(shaped_models.LLAMA_3_2_1B) == 1_235_814_400


def test_parameter_count_matches_an_instantiated_model():
    for tied in (True, False):
        shape = dict(TINY, tie_word_embeddings=tied)
        model = shaped_models.random_llama(shape, "cpu", torch.float32)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert shaped_models.parameter_count(shape) == sum(unique.values())


def test_random_model_and_adapter_decode_to_max_new_tokens_losslessly():
    """No EOS: every run does the same work; the random adapter's drafts still leave plain decoding's output."""
    model = shaped_models.random_llama(TINY, "cpu", torch.float32)
    adapter = shaped_models.random_adapter(model, exit_layer=1, draft_vocab=128)
    assert adapter.draft_vocab_ids.tolist() == list(range(128))
    prompt = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    plain = kx.generate(model, prompt, max_new_tokens=12)
    spec = kx.speculative_generate(model, prompt, adapter=adapter, max_new_tokens=12, threshold=0.0)
    assert spec.sequences.shape[1] == prompt.shape[1] + 12
    assert torch.equal(spec.sequences, plain.sequences)
