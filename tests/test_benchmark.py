"""`kangaroo bench` end to end on a tiny random model with a character-level chat tokenizer (CPU, fast)."""
import json
import os

import pytest
import torch

import kangaroo_ext as kx
from kangaroo_ext import cli, io
from kangaroo_ext.benchmarking import harness, report
from kangaroo_ext.engine.copy_rounds import DEFAULT_COPY_GAMMA

from models import tiny_model

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And times 3?"]},
    {"question_id": 3, "category": "writing", "turns": ["Describe a cat."]},
    {"question_id": 4, "category": "coding", "turns": ["Sort a list.", "In C?"]},
]
METHODS = ["kangaroo", "kangaroo-adapter", "kangaroo-copy", "pld", "plain", "hf-eager", "hf-pld"]  # not hf-static


class CharChatTokenizer:
    """Printable ASCII chars are ids 0..94, id 100 is EOS; a ChatML-like template. Logs every conversation
    it renders, so tests can see what context each turn was given."""
    eos_token_id = 100
    chat_template = "<|{role}|>{content}|"

    def __init__(self):
        self.rendered = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        assert tokenize is False
        self.rendered.append([dict(m) for m in messages])
        text = "".join(f"<|{m['role']}|>{m['content']}|" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 32 if 32 <= ord(c) < 127 else 0 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i) if i < 95 else ("" if skip_special_tokens else "<?>") for i in ids)


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """The harness is under test here, not the kernels (tests/test_ops.py covers those): use the PyTorch
    reference ops rather than Triton's CPU interpreter, and one thread, since with tiny matrices intra-op
    threads only add overhead and on a busy 2-core machine they time-slice (5 ms vs 300 ms a forward)."""
    threads, backend = torch.get_num_threads(), os.environ.get("KANGAROO_BACKEND")
    torch.set_num_threads(1)
    os.environ["KANGAROO_BACKEND"] = "reference"
    yield
    torch.set_num_threads(threads)
    if backend is None:
        os.environ.pop("KANGAROO_BACKEND", None)
    else:
        os.environ["KANGAROO_BACKEND"] = backend


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    """One benchmark run shared by the tests below: (results, tokenizer, out_dir)."""
    tokenizer = CharChatTokenizer()
    adapter = kx.Adapter.for_model(model, exit_layer=2)
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    questions = io.load_questions(str(path))
    # η = 0: always draft γ, so acceptance by position has data
    results = harness.new_results(str(path), questions, "cpu", torch.float32, 12, 0.0, 4, "test", METHODS, 2)
    results = harness.run_benchmark(model, tokenizer, questions, METHODS, adapter=adapter, max_new_tokens=12,
                               threshold=0.0, max_draft=4, hf_max_questions=2, warmup=1, progress=False,
                               results=results)
    out = tmp_path_factory.mktemp("out")
    harness.write_outputs(results, str(out))
    return results, tokenizer, out


def test_every_method_ran_every_turn_and_hf_fewer_questions(run):
    results, _, _ = run
    assert not results.get("errors"), results.get("errors")
    assert list(results["methods"]) == METHODS
    for m in ("kangaroo", "plain"):
        assert len(results["methods"][m]["turns"]) == 7
    # hf-* ran 2 questions, picked round-robin over categories (writing, math), not the first 2 in the file only
    hf_turns = results["methods"]["hf-eager"]["turns"]
    assert sorted({t["question_id"] for t in hf_turns}) == [1, 2]
    for t in results["methods"]["plain"]["turns"]:
        assert 0 < t["new_tokens"] <= 12 and t["seconds"] > 0 and t["tok_per_s"] > 0


def test_second_turn_sees_the_methods_own_first_answer(run):
    results, tokenizer, _ = run
    rendered = {(c[0]["content"], c[1]["content"], c[2]["content"]) for c in tokenizer.rendered if len(c) == 3}
    for m, r in results["methods"].items():
        turns = {(t["question_id"], t["turn"]): t for t in r["turns"]}
        for q in QUESTIONS:
            if len(q["turns"]) < 2 or (q["question_id"], 1) not in turns:
                continue
            first = turns[(q["question_id"], 0)]
            assert (q["turns"][0], first["output"], q["turns"][1]) in rendered, m
            # the second prompt holds the first prompt and the first answer
            assert turns[(q["question_id"], 1)]["prompt_tokens"] >= first["prompt_tokens"] + len(first["output"])


def test_kangaroo_identical_to_plain_in_fp32(run):
    results, _, _ = run
    summary = report.summarize(results)
    assert summary["kangaroo"]["overall"]["identical_to_plain"] == 1.0
    assert summary["plain"]["overall"]["identical_to_plain"] == 1.0
    k = summary["kangaroo"]["overall"]
    assert k["mean_accepted"] >= 1.0 and k["rounds"] == sum(k["accepted_histogram"])
    # kangaroo copies by default on the CPU, so rounds may propose up to DEFAULT_COPY_GAMMA drafts
    assert len(k["acceptance_by_position"]) == max(4, DEFAULT_COPY_GAMMA) and all(0 <= p <= 1 for p in k["acceptance_by_position"][:1])
    assert summary["plain"]["overall"]["speedup_vs_plain"] == pytest.approx(1.0)


def test_copied_draft_methods_are_identical_to_plain_and_record_their_sources(run):
    """kangaroo-copy and pld (our engine's copied drafts) beside kangaroo: same output as plain, and each
    turn says which draft source its rounds used; pld never uses the adapter's drafts."""
    results, _, _ = run
    summary = report.summarize(results)
    for m in ("kangaroo-copy", "pld"):
        assert summary[m]["overall"]["identical_to_plain"] == 1.0, m
        assert summary[m]["overall"]["mean_accepted"] >= 1.0
        for t in results["methods"][m]["turns"]:
            assert sum(row["rounds"] for row in t["draft_sources"].values()) == t["rounds"]
    assert all(set(t["draft_sources"]) <= {"copy", "plain"} for t in results["methods"]["pld"]["turns"])
    # kangaroo follows speculative_generate's default: copied drafts on in host mode, the CPU's;
    # kangaroo-adapter never copies
    assert "draft_sources" in results["methods"]["kangaroo"]["turns"][0]
    assert summary["kangaroo-adapter"]["overall"]["identical_to_plain"] == 1.0
    assert not any("draft_sources" in t for t in results["methods"]["kangaroo-adapter"]["turns"])


def test_summary_json_has_the_latest_json_form(run):
    _, _, out = run
    latest = json.loads((out / "summary.json").read_text())
    for key, kind in (("device", str), ("date", str), ("commit", str), ("questions", str),
                      ("max_new_tokens", int), ("methods", dict), ("per_category", dict)):
        assert isinstance(latest[key], kind), key
    for key in ("speedup_vs_plain", "speedup_vs_hf_eager", "identical_to_plain"):
        assert isinstance(latest[key], float), key
    assert set(latest["methods"]) == set(METHODS)
    assert all(isinstance(v["tok_per_s"], float) for v in latest["methods"].values())
    assert isinstance(latest["methods"]["kangaroo"]["mean_accepted"], float)
    assert set(latest["per_category"]) == {"writing", "math", "coding"}
    for block in latest["per_category"].values():
        assert isinstance(block["speedup_vs_plain"], float) and isinstance(block["mean_accepted"], float)
    assert latest["speedup_vs_hf_eager_questions"] == 2
    full = json.loads((out / "results.json").read_text())
    assert full["summary"]["kangaroo"]["overall"]["accepted_histogram"]


def test_outputs_written_atomically_and_markdown_table(run):
    _, _, out = run
    names = set(os.listdir(out))
    assert {"results.json", "summary.json", "results.md"} <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    md = (out / "results.md").read_text()
    assert "| method | questions | turns | tok/s (mean of turns) |" in md
    assert "| kangaroo |" in md and "| **all** |" in md


def test_the_report_says_what_the_prefill_took_and_the_decode_only_speedup(run):
    """The engine's methods record each turn's prefill; the summary gives its median and the speedup without it
    (each turn's tokens over its time less its prefill), the report says both; the hf-* methods have neither."""
    results, _, out = run
    full = json.loads((out / "results.json").read_text())["summary"]
    kangaroo, plain = full["kangaroo"]["overall"], full["plain"]["overall"]
    turns = results["methods"]["kangaroo"]["turns"]
    base = {(str(t["question_id"]), t["turn"]): t for t in results["methods"]["plain"]["turns"]}
    decode = lambda t: t["new_tokens"] / (t["seconds"] - t["prefill_s"])  # noqa: E731
    want = sum(map(decode, turns)) / sum(decode(base[(str(t["question_id"]), t["turn"])]) for t in turns)
    assert kangaroo["speedup_vs_plain_decode_only"] == pytest.approx(want)
    assert plain["speedup_vs_plain_decode_only"] == pytest.approx(1.0)
    prefill = sorted(1000 * t["prefill_s"] for t in turns)
    assert prefill[0] <= kangaroo["prefill_ms_median"] <= prefill[-1] and kangaroo["prefill_ms_median"] > 0
    assert "prefill_ms_median" not in full["hf-eager"]["overall"]
    latest = json.loads((out / "summary.json").read_text())
    assert latest["speedup_vs_plain_decode_only"] == pytest.approx(want)
    assert latest["methods"]["kangaroo"]["prefill_ms_median"] == pytest.approx(kangaroo["prefill_ms_median"])
    md = (out / "results.md").read_text()
    assert f"kangaroo {kangaroo['prefill_ms_median']:.1f} ms" in md and "Decoding alone" in md


def test_plots_written(run):
    pytest.importorskip("matplotlib")
    _, _, out = run
    for name in ("speedup_by_category.png", "accepted_per_round.png", "acceptance_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.json"

    def boom(f):
        f.write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        io.atomic_write(str(target), boom)
    assert os.listdir(tmp_path) == []


# ---- bad input: one clear error, before any model loads ------------------------------------------

def _bench(*argv):
    """`kangaroo bench ARGV` up to the point where it would load the model (it must fail before)."""
    args = cli.build_parser().parse_args(["bench", *argv])
    return args.func(args)


@pytest.fixture
def qfile(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return str(path)


@pytest.mark.parametrize("lines, message", [
    (['{"question_id": 1, "category": "a", "turns": ["x"]}', '{"question_id": 2, '], r"line 2 is not valid JSON"),
    (['{"question_id": 1, "category": "a"}'], r"line 1: missing field\(s\) turns"),
    (['{"question_id": 1, "category": "a", "turns": []}'], r"line 1: 'turns' must be a non-empty list"),
    (['[1, 2]'], r"line 1: expected a JSON object"),
    ([''], r"no questions"),
])
def test_malformed_questions_file(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        _bench("--questions", str(path))


def test_missing_questions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions file not found: .*nope.jsonl"):
        _bench("--questions", str(tmp_path / "nope.jsonl"))


def test_unknown_method_lists_the_valid_ones(qfile):
    with pytest.raises(ValueError, match=r"unknown method 'medusa'; valid methods: kangaroo, kangaroo-adapter, "
                                         r"kangaroo-copy, kangaroo-gate, kangaroo-nogate, pld, "
                                         r"plain, hf-eager, hf-pld, hf-static, hf-prompt-lookup"):
        _bench("--questions", qfile, "--methods", "kangaroo,medusa")


def test_unknown_category_lists_the_present_ones(qfile):
    with pytest.raises(ValueError, match=r"unknown category poetry; categories present: writing, math, coding"):
        _bench("--questions", qfile, "--categories", "writing,poetry")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_new_tokens_must_be_positive(qfile, value):
    with pytest.raises(ValueError, match=r"--max-new-tokens must be > 0"):
        _bench("--questions", qfile, "--max-new-tokens", value)


def test_category_filter_and_round_robin_selection():
    qs = io.select_questions(QUESTIONS, categories=["writing", "coding"])
    assert [q["question_id"] for q in qs] == [1, 3, 4]
    assert [q["question_id"] for q in io.select_questions(QUESTIONS, max_questions=3)] == [1, 2, 4]


def test_run_benchmark_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        harness.run_benchmark(model, CharChatTokenizer(), QUESTIONS, ["plain"], max_new_tokens=0)
    with pytest.raises(ValueError, match="needs an adapter"):
        harness.run_benchmark(model, CharChatTokenizer(), QUESTIONS, ["kangaroo"])


def test_a_failing_method_is_recorded_and_the_others_still_run(model, monkeypatch):
    real = harness.make_runner

    def runner(method, *args):
        if method == "hf-eager":
            def broken(*a, **k):
                raise RuntimeError("compile failed")
            return broken
        return real(method, *args)
    monkeypatch.setattr(harness, "make_runner", runner)
    saved = []
    results = harness.run_benchmark(model, CharChatTokenizer(), QUESTIONS[:1], ["hf-eager", "plain"],
                                    max_new_tokens=4, warmup=0, progress=False,
                                    on_turn_done=lambda r: saved.append(list(r["methods"])))
    assert results["errors"] == {"hf-eager": "RuntimeError: compile failed"}
    assert list(results["methods"]) == ["plain"] and saved[0] == [] and saved[-1] == ["plain"]
    assert len(saved) == 1 + 2 + 1, "saved after the failure, after each of plain's 2 turns, after plain"
    assert "**hf-eager failed**" in report.markdown_report(results, report.summarize(results), {})


def test_resume_keeps_finished_methods_and_refuses_other_settings(run, tmp_path):
    results, _, _ = run
    io.write_json(str(tmp_path / "results.json"), results)
    fresh = {**results, "config": dict(results["config"], methods=["hf-static"]), "methods": {}}
    resumed = harness.resumed(str(tmp_path / "results.json"), fresh)
    assert list(resumed["methods"]) == METHODS  # all kept; only hf-static would run
    assert resumed["config"]["methods"] == METHODS + ["hf-static"]
    other = {**results, "config": dict(results["config"], max_new_tokens=99), "methods": {}}
    with pytest.raises(ValueError, match="different max_new_tokens"):
        harness.resumed(str(tmp_path / "results.json"), other)


def test_an_interrupted_run_resumes_at_the_first_unfinished_turn(model, tmp_path, monkeypatch):
    """Killed after 3 turns (the runner raises), then resumed from the saved results.json: the 3 finished
    turns are kept as they were, only the 4 others run, and the second turn of the question cut in the
    middle is prompted with that method's own first answer from the saved file."""
    qs = QUESTIONS[:3]
    path = str(tmp_path / "results.json")
    real, calls, die_at = harness.make_runner, [], [4]   # warm-up 0: the 4th timed turn dies mid-run

    def save(results):
        io.write_json(path, results)

    def counted(method, *args):
        run = real(method, *args)

        def wrapped(ids, max_new, stop_after=None):
            calls.append(ids)
            if len(calls) == die_at[0]:
                raise KeyboardInterrupt
            return run(ids, max_new, stop_after)
        return wrapped
    tokenizer = CharChatTokenizer()
    monkeypatch.setattr(harness, "make_runner", counted)
    with pytest.raises(KeyboardInterrupt):
        harness.run_benchmark(model, tokenizer, qs, ["plain"], max_new_tokens=6, warmup=0, progress=False,
                              on_turn_done=save)
    saved = json.loads(open(path).read())
    assert len(saved["methods"]["plain"]["turns"]) == 3
    calls.clear()
    die_at[0] = -1
    resumed = harness.run_benchmark(model, tokenizer, qs, ["plain"], max_new_tokens=6, warmup=0, progress=False,
                                    results=json.loads(open(path).read()), on_turn_done=save)
    turns = resumed["methods"]["plain"]["turns"]
    assert len(turns) == 5 and len(calls) == 2 and turns[:3] == saved["methods"]["plain"]["turns"]
    fresh = harness.run_benchmark(model, tokenizer, qs, ["plain"], max_new_tokens=6, warmup=0, progress=False)
    assert [t["output_sha1"] for t in fresh["methods"]["plain"]["turns"]] == [t["output_sha1"] for t in turns]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["bench", "--questions", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kangaroo bench: error: questions file not found")


# ---- provenance: which commit a copied checkout measured ------------------------------------------

def _git(cwd, *args):
    import subprocess
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _write_code(root, version: str):
    for rel, text in (("csrc/a.cu", "// kernel " + version), ("kangaroo_ext/m.py", "X = 1"),
                      ("triton_kernels/k.py", "Y = 2"), ("setup.py", "# setup"), ("bench/results/r.json", version)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.skipif(os.system("git --version > /dev/null 2>&1") != 0, reason="git is not installed")
def test_code_trees_name_the_commit_of_a_copy_with_a_stale_git(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _write_code(repo, "v1")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "v1")
    v1 = _git(repo, "log", "-1", "--format=%h")
    _write_code(repo, "v2")
    _git(repo, "commit", "-qam", "v2")
    v2 = _git(repo, "log", "-1", "--format=%h")
    # A copy of v1's files whose .git knows nothing of them (as on the device machines), plus an untracked
    # result file under bench/ and an ignored build product: neither changes the hashes.
    copy = tmp_path / "copy"
    copy.mkdir()
    _git(copy, "init", "-q")
    _write_code(copy, "v1")
    (copy / "bench" / "results" / "new.json").write_text("{}")
    (copy / ".gitignore").write_text("*.so\n")
    (copy / "kangaroo_ext" / "_C.so").write_bytes(b"\0")
    trees = io.code_trees(str(copy))
    assert set(trees) == {"csrc", "kangaroo_ext", "triton_kernels", "setup.py"}
    assert io.which_commit(trees, str(repo)) == [v1]
    assert _git(copy, "diff", "--cached", "--name-only") == "", "the copy's own index stays untouched"
    _write_code(copy, "v2")
    assert io.which_commit(io.code_trees(str(copy)), str(repo)) == [v2]
    (copy / "csrc" / "a.cu").write_text("// edited")
    assert io.which_commit(io.code_trees(str(copy)), str(repo)) == []


def test_code_trees_without_a_checkout_is_none(tmp_path):
    assert io.code_trees(str(tmp_path / "missing")) is None
    (tmp_path / "csrc").mkdir()
    assert io.code_trees(str(tmp_path)) is None  # no .git here: an installed package, not a checkout


def test_which_commit_cli_names_this_checkouts_commit_or_says_none(tmp_path, capsys):
    from kangaroo_ext import cli
    trees = io.code_trees()
    if trees is None:
        pytest.skip("the package does not run from a git checkout")
    result = tmp_path / "kernels.json"
    result.write_text(json.dumps({"commit": "stale", "code_trees": trees}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(io.__file__)))
    dirty = _git(root, "status", "--porcelain", "--", *io.CODE_PATHS) != ""
    rc = cli.main(["which-commit", str(result)])
    out = capsys.readouterr().out
    if dirty:
        assert rc == 1 and "no commit" in out
    else:
        assert rc == 0 and _git(root, "log", "-1", "--format=%h") in out.split()
    result.write_text(json.dumps({"commit": "x"}))
    assert cli.main(["which-commit", str(result)]) == 2
    assert "records no code_trees" in capsys.readouterr().err


def test_a_sampled_benchmark_runs_every_method_reproducibly(model):
    adapter = kx.Adapter.for_model(model, exit_layer=2)
    runs = [harness.run_benchmark(model, CharChatTokenizer(), QUESTIONS[:2], ["kangaroo", "plain", "hf-eager"],
                                  adapter=adapter, max_new_tokens=8, warmup=0, progress=False, temperature=1.0)
            for _ in range(2)]
    for method in ("kangaroo", "plain", "hf-eager"):
        turns = [r["methods"][method]["turns"] for r in runs]
        assert len(turns[0]) == 4
        if method != "hf-eager":  # ours are seeded per turn; transformers' sampling is not
            assert [t["output_sha1"] for t in turns[0]] == [t["output_sha1"] for t in turns[1]]
    assert report.summarize(runs[0])["kangaroo"]["overall"]["mean_accepted"] >= 1.0


def test_provenance_records_the_run_switches_in_effect(monkeypatch):
    """Every result says which side of each run-time switch it measured: defaults when unset, the
    environment's value when set (a flag on by default reads unset as on)."""
    from kangaroo_ext import config
    for name in ("KANGAROO_TENSOR_CORE_GEMV", "KANGAROO_BATCH_INVARIANT_ATTENTION", "KANGAROO_DISABLE_PDL"):
        monkeypatch.delenv(name, raising=False)
    flags = io.provenance("cpu")["run_flags"]
    assert set(flags) == {k.name for k in config.KNOBS.values() if k.kind == "flag" and k.when == "run"}
    assert flags["KANGAROO_TENSOR_CORE_GEMV"] is True and flags["KANGAROO_BATCH_INVARIANT_ATTENTION"] is True
    assert flags["KANGAROO_DISABLE_PDL"] is False
    monkeypatch.setenv("KANGAROO_TENSOR_CORE_GEMV", "0")
    monkeypatch.setenv("KANGAROO_DISABLE_PDL", "1")
    flags = io.provenance("cpu")["run_flags"]
    assert flags["KANGAROO_TENSOR_CORE_GEMV"] is False and flags["KANGAROO_DISABLE_PDL"] is True
