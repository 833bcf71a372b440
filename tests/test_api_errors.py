"""Every bad input to the public API gets a clear error naming the argument; nothing is emitted."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kangaroo_ext as kx
from kangaroo_ext.engine.spec import model_spec

from models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapter(model):
    return kx.Adapter.for_model(model, exit_layer=2, init="random")


def spec_call(model, adapter, **kw):
    args = dict(max_new_tokens=4, eos_token_id=[])
    args.update(kw)
    ids = args.pop("input_ids", [1, 2, 3])
    return kx.speculative_generate(model, ids, adapter=adapter, **args)


@pytest.mark.parametrize("kw,msg", [
    (dict(threshold=1.5), r"threshold \(η\) must be a number in \[0, 1\]"),
    (dict(threshold=-0.1), r"threshold \(η\) must be a number in \[0, 1\]"),
    (dict(threshold=float("nan")), r"threshold \(η\) must be a number in \[0, 1\]"),
    (dict(threshold="0.3"), r"threshold \(η\) must be a number in \[0, 1\]"),
    (dict(max_draft=0), r"max_draft \(γ\) must be an int in \[1, 32\] or None"),
    (dict(max_draft=2.5), r"max_draft \(γ\) must be an int in \[1, 32\] or None"),
    (dict(max_draft=33), r"max_draft \(γ\) must be an int in \[1, 32\] or None"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive int"),
    (dict(input_ids=[]), "input_ids is empty"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids is empty"),
    (dict(input_ids=torch.ones(2, 5, dtype=torch.long)), r"input_ids must be \[1, T\] or \[T\] \(one sequence"),
    (dict(input_ids=torch.ones(1, 5)), "input_ids must hold integer token ids"),
    (dict(input_ids=[1, 2, 500]), r"token ids must lie in \[0, 111\)"),
    (dict(input_ids="hello"), "input_ids must be a LongTensor"),
    (dict(max_new_tokens=1022), "exceeds the model's context limit of 1024"),
    (dict(mode="warp"), "mode must be one of"),
    (dict(eos_token_id="x"), "eos_token_id must be an int or a list of ints"),
])
def test_speculative_generate_rejects(model, adapter, kw, msg):
    with pytest.raises(ValueError, match=msg):
        spec_call(model, adapter, **kw)


def test_plain_generate_rejects(model):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        kx.generate(model, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids is empty"):
        kx.generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        kx.generate(model, [1, 2], max_new_tokens=3, mode="graphs")


def test_missing_or_foreign_adapter(model):
    with pytest.raises(ValueError, match="adapter is required"):
        kx.speculative_generate(model, [1, 2], adapter=None, max_new_tokens=3)
    with pytest.raises(ValueError, match="adapter must be a kangaroo_ext.Adapter"):
        kx.speculative_generate(model, [1, 2], adapter=object(), max_new_tokens=3)
    other = tiny_model("llama", hidden=48, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="adapter: trained for a model with hidden_size=48"):
        spec_call(model, kx.Adapter.for_model(other, exit_layer=2))
    same_shape_other_weights = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="trained for another checkpoint of this architecture"):
        spec_call(model, kx.Adapter.for_model(same_shape_other_weights, exit_layer=2))


def test_adapter_on_other_dtype_or_device(model):
    ad = kx.Adapter.for_model(model, exit_layer=2).to(torch.float64)
    with pytest.raises(ValueError, match="adapter: is on cpu / torch.float64 but the model is on cpu / torch.float32"):
        spec_call(model, ad)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="adapter: is on cuda"):
            spec_call(model, kx.Adapter.for_model(model, exit_layer=2).cuda())


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM, "
                                         "MistralForCausalLM, Qwen2ForCausalLM"):
        kx.generate(gpt2, [1, 2], max_new_tokens=2)


def test_mixed_model_dtypes_are_rejected():
    model = tiny_model("llama", layers=3, seed=5)
    import copy
    mixed = copy.deepcopy(model)
    mixed.model.layers[1].to(torch.float64)
    with pytest.raises(ValueError, match="parameters mix dtypes"):
        model_spec(mixed)


def test_exit_layer_out_of_range_in_adapter_constructor(model):
    for bad in (0, 6, -1, 2.0):
        with pytest.raises(ValueError, match=r"exit_layer must be an int in \[1, 5\]"):
            kx.Adapter.for_model(model, exit_layer=bad)


def test_adapter_save_load_round_trip_and_bad_dirs(model, tmp_path):
    ad = kx.Adapter.for_model(model, exit_layer=3, init="random", seed=7)
    ad.save_pretrained(tmp_path / "a")
    back = kx.Adapter.from_pretrained(str(tmp_path / "a"))
    for (n1, p1), (n2, p2) in zip(ad.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert back.exit_layer == 3 and back.config["target"] == ad.config["target"]
    ids = [5, 6, 7]
    a = kx.speculative_generate(model, ids, adapter=ad, max_new_tokens=8, eos_token_id=[]).sequences
    b = kx.speculative_generate(model, ids, adapter=back, max_new_tokens=8, eos_token_id=[]).sequences
    assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        kx.Adapter.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        kx.Adapter.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a kangaroo_ext adapter config"):
        kx.Adapter.from_pretrained(str(tmp_path / "bad"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from kangaroo_ext.cli import main
    from kangaroo_ext.io import read_prompts
    assert main(["generate", "--file", str(tmp_path / "nope.jsonl")]) == 2
    assert "--file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_prompts(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"other": 1}\n')
    with pytest.raises(ValueError, match="line 1: no 'prompt' field"):
        read_prompts(str(empty))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n{"turns": ["b", "c"]}\n"d"\n\n')
    assert read_prompts(str(good))[0] == ["a", "b", "d"]


@pytest.mark.parametrize("kw,named", [
    (dict(temperature=0.5), "temperature=0.5"),
    (dict(top_k=5), "top_k=5"),
    (dict(top_p=0.9), "top_p=0.9"),
    (dict(seed=3), "seed=3"),
    (dict(generator=torch.Generator()), "generator="),
    (dict(temperature=0.5, seed=3), "temperature=0.5, seed=3"),
])
@pytest.mark.parametrize("call", ["speculative_generate", "generate"])
def test_sampling_arguments_without_do_sample_are_an_error(model, adapter, kw, named, call):
    """Greedy decoding would ignore them; the error names them and do_sample=True."""
    with pytest.raises(ValueError, match=r"only appl(y|ies) to sampling: pass do_sample=True") as caught:
        if call == "generate":
            kx.generate(model, [1, 2, 3], max_new_tokens=2, eos_token_id=[], **kw)
        else:
            spec_call(model, adapter, **kw)
    assert named in str(caught.value)


def test_the_default_sampling_values_are_fine_when_greedy(model, adapter):
    out = spec_call(model, adapter, do_sample=False, temperature=1.0, top_k=0, top_p=1, seed=None)
    assert out.stats.sampling is None and out.stats.new_tokens == 4
