"""The command line as a newcomer meets it: every bad argument fails fast, before the model loads, with
one line naming it; the shipped data makes `bench` and `train` work with no extra files; --help shows
every default and no "(default: None)"."""
import json
import time

import pytest
import torch

from kangaroo_ext import cli, config, io


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model is the slow part: these checks must all happen before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "load_model", refuse)


def _fails_fast(argv, message, capsys):
    t0 = time.perf_counter()
    assert cli.main(argv) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert seconds < 3.0, f"{argv}: {seconds:.1f} s to fail"


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--threshold", "2"], "--threshold (η) must be in [0, 1], got 2.0"),
    (["generate", "hi", "--threshold", "-0.5"], "--threshold (η) must be in [0, 1]"),
    (["generate", "hi", "--max-draft", "0"], "--max-draft (γ) must be in [1, 32], got 0"),
    (["generate", "hi", "--max-draft", "40"], "--max-draft (γ) must be in [1, 32], got 40"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
    (["generate", "hi", "--adapter", "/nonexistent/adapter"], "adapter: no such folder: '/nonexistent/adapter'"),
    (["generate", "   "], "the prompt is empty"),
    (["generate", "--file", "/nonexistent.jsonl"], "--file not found: /nonexistent.jsonl"),
    (["bench", "--max-new-tokens", "-1"], "--max-new-tokens must be > 0"),
    (["bench", "--threshold", "7"], "--threshold (η) must be in [0, 1]"),
    (["bench", "--methods", "kangaroo,medusa"], "unknown method 'medusa'"),
    (["bench", "--questions", "/nope.jsonl"], "questions file not found: /nope.jsonl"),
    (["bench", "--categories", "poetry"], "unknown category poetry"),
    (["bench", "--adapter", "/nonexistent"], "adapter: no such folder"),
    (["train", "--prompts", "/nope.jsonl"], "prompt file not found: /nope.jsonl"),
    (["train", "--steps", "0"], "steps must be a positive int"),
    (["train", "--draft-vocab", "-3"], "draft_vocab must be an int"),
    (["train", "--cut-loops", "-1"], "cut_loops must be an int >= 0 (periods of a loop kept; 0 = no cut), got -1"),
    (["train", "--ship"], "--ship chooses by measured speedup: give --mt-bench"),
    (["train", "--model", "/no/such/model"], "--model: no such model folder"),
    (["generate", "hi", "--temperature", "0.5"], "--temperature only applies to sampling: add --sample"),
    (["generate", "hi", "--seed", "3"], "--seed only applies to sampling: add --sample"),
    (["generate", "hi", "--top-k", "5", "--top-p", "0.9"], "--top-k, --top-p only apply to sampling: add --sample"),
    (["generate", "hi", "--sample", "--temperature", "0"], "temperature must be a finite number > 0"),
    (["generate", "hi", "--threads", "0"], "--threads must be an int >= 1, got 0"),
    (["bench", "--threads", "-2"], "--threads must be an int >= 1, got -2"),
    (["train", "--threads", "0"], "--threads must be an int >= 1, got 0"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, capsys, no_model):
    _fails_fast(argv, message, capsys)


def test_an_adapter_folder_without_weights_fails_before_loading(tmp_path, capsys, no_model):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "kangaroo_ext-adapter", "exit_layer": 1,
                                                              "rms_norm_eps": 1e-5, "target": {}}))
    _fails_fast(["generate", "hi", "--adapter", str(tmp_path)], "no adapter.safetensors", capsys)


def test_cuda_requested_without_a_gpu_fails_before_loading(capsys, no_model, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails_fast(["generate", "hi", "--device", "cuda"], "--device cuda: no CUDA device is available", capsys)


def test_bench_without_questions_runs_the_shipped_mt_bench(monkeypatch, tmp_path, capsys):
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(name, device, dtype):
        seen["loaded"] = name
        raise Stop
    monkeypatch.setattr(cli, "load_model", fake_load)
    with pytest.raises(Stop):
        cli.main(["bench", "--out", str(tmp_path), "--max-questions", "8"])
    assert seen["loaded"] == "default"
    args = cli.build_parser().parse_args(["bench"])
    assert args.questions is None and io.MT_BENCH_FILE.endswith("mt_bench_question.jsonl")


def test_the_shipped_data_files_are_valid():
    questions = io.load_questions()
    assert len(questions) == 80 and len({q["category"] for q in questions}) == 8
    assert all(len(q["turns"]) == 2 for q in questions)
    prompts, skipped = io.read_prompts(io.TRAIN_PROMPTS_FILE, strict=True)
    assert len(prompts) == 7473 and not skipped
    assert cli.build_parser().parse_args(["train"]).prompts == io.TRAIN_PROMPTS_FILE
    long_context = io.load_questions(io.LONG_CONTEXT_FILE)
    assert len(long_context) >= 20 and {q["category"] for q in long_context} == {"summarization", "rag"}


def test_copy_draft_flag_and_the_long_context_shorthand(monkeypatch, tmp_path):
    """--copy-draft reaches generate and bench; --questions long-context names the shipped dev set."""
    p = cli.build_parser()
    assert p.parse_args(["generate", "--copy-draft"]).copy_draft is True
    assert p.parse_args(["generate"]).copy_draft is None                    # speculative_generate's default
    assert p.parse_args(["bench", "--no-copy-draft"]).copy_draft is False
    seen = {}

    class Stop(Exception):
        pass

    def fake_select(questions, categories, max_questions):
        seen["n"] = len(questions)
        raise Stop
    monkeypatch.setattr(io, "select_questions", fake_select)
    with pytest.raises(Stop):
        cli.main(["bench", "--questions", "long-context", "--out", str(tmp_path)])
    assert seen["n"] == len(io.load_questions(io.LONG_CONTEXT_FILE))


@pytest.mark.parametrize("command", ["generate", "bench", "train"])
def test_help_shows_defaults_and_never_default_none(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    if command in ("generate", "bench"):
        assert "--max-new-tokens MAX_NEW_TOKENS the most tokens" in text
        assert "--max-draft MAX_DRAFT γ, the most drafts per round (default: the adapter's recommendation" in text
    else:
        assert "--steps STEPS optimizer steps per exit layer (default: 1000)" in text


class _Loaded(Exception):
    """Raised by a fake model loader: the arguments passed every check."""


@pytest.fixture
def stop_at_load(monkeypatch):
    def loaded(*args, **kwargs):
        raise _Loaded
    monkeypatch.setattr(cli, "load_model", loaded)


@pytest.mark.parametrize("argv", [["generate", "hi", "--sample", "--temperature", "0.5", "--seed", "3"],
                                  ["generate", "hi", "--sample"], ["generate", "hi"]])
def test_sampling_flags_with_sample_and_greedy_defaults_pass(argv, stop_at_load):
    with pytest.raises(_Loaded):
        cli.main(argv)


@pytest.mark.parametrize("argv,threads", [(["generate", "hi"], config.DEFAULT_CPU_THREADS),
                                          (["generate", "hi", "--threads", "2"], 2),
                                          (["bench", "--threads", "3"], 3)])
def test_decoding_commands_set_the_threads(argv, threads, stop_at_load, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(5)
    with pytest.raises(_Loaded):
        cli.main(argv)
    assert torch.get_num_threads() == threads


def test_omp_num_threads_is_the_default_when_set(stop_at_load, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert config.cpu_threads() == (2, "OMP_NUM_THREADS")
    assert config.cpu_threads(3) == (3, "--threads")
    with pytest.raises(_Loaded):
        cli.main(["generate", "hi"])
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two' is not a thread count"):
        config.cpu_threads()


def test_generate_help_says_the_sampling_rule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "without --sample they are an error" in text and "--threads THREADS torch CPU threads" in text


def test_info_names_the_triton_interpreter_and_the_threads(monkeypatch):
    from kangaroo_ext import info
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    collected = info.collect()
    if collected["backends"]["triton"].startswith("unavailable"):
        pytest.skip(f"triton is not usable here: {collected['backends']['triton']}")
    assert collected["backends"]["triton"].startswith("interpreter only (TRITON_INTERPRET=1, no GPU)")
    assert collected["CPU threads"].startswith(f"{config.DEFAULT_CPU_THREADS} when decoding (the default")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "no GPU to run on" in info.collect()["backends"]["triton"]
    monkeypatch.setenv("OMP_NUM_THREADS", "x")
    assert info.collect()["CPU threads"].startswith("invalid: OMP_NUM_THREADS='x'")
