"""Adapter training (kangaroo_ext.training): the training forward equals the engine's draft path, the
teacher's cached exit states equal the engine's, training learns, is deterministic and resumable, bad
records are counted, the CLI fails cleanly, and the whole pipeline (generation, teacher, training, MT-bench
sweep, report, ship) runs on a tiny model. CPU, fp32."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import kangaroo_ext as kx
from kangaroo_ext import cli, io, ops, training
from kangaroo_ext.training import data, draft, evaluation, loop, pipeline
from kangaroo_ext.engine.engine import Engine
from kangaroo_ext.engine.spec import model_spec
from kangaroo_ext.ops import reference

from models import prompts, tiny_model

VOCAB = 111


class FakeTokenizer:
    """Characters to ids, with a chat template: all the training pipeline asks of a tokenizer."""
    chat_template = "<{role}>{content}"
    pad_token_id = 0
    eos_token_id = 2

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [[3 + ord(c) % (VOCAB - 3) for c in t] for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)


def sample_sequences(model, n=10, seed=0, answer_len=12):
    """(prompt, answer) pairs: random prompts, the model's own greedy answers (self-distillation)."""
    pairs, _ = data.generate_answers(model, [p.tolist() for p in prompts(n, seed=seed, min_len=2, max_len=14)],
                                     answer_len, batch_size=4, eos_ids=[], pad_id=0, progress=False)
    return pairs


@pytest.fixture(scope="module")
def distilled():
    model = tiny_model("llama")
    seqs = sample_sequences(model)
    cache = data.teacher_pass(model, seqs, [1, 2], top_k=16, loss_on_prompt=False, tokens_per_batch=64,
                              progress=False)
    spec = model_spec(model)
    return model, spec, seqs, cache, training.rope_tables(spec, int(cache.seq_len.max()))


def opts(**kw):
    base = dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=3, checkpoint_every=4, progress=False, verbose=False)
    return training.TrainOptions(**dict(base, **kw))


# ---- the training forward is the engine's draft path ------------------------------------------------

def engine_adapter_steps(model, adapter, ids):
    """The engine's draft path, one position at a time: exit states, y (the adapter's post-norm
    output, captured from the engine's own norm call) and the drafted (token, confidence)."""
    engine = Engine(model_spec(model))
    engine.reserve(ids.shape[1] + 1, 1)
    engine.bind_adapter(adapter)
    seen = []
    norm = engine._norm
    engine._norm = lambda x, res, w: seen.append((w, norm(x, res, w))) or seen[-1][1]
    exits, ys, tokens, confs = [], [], [], []
    for p in range(ids.shape[1]):
        pos = torch.tensor([[p]])
        x, res = engine.run_layers(F.embedding(ids[:, p:p + 1], engine.spec.embed), pos, 0, adapter.exit_layer)
        h_exit, (tok, conf, _) = engine.adapter_forward(x, res, pos)
        exits.append(h_exit)
        ys.append(next(out for w, out in reversed(seen) if w is engine.adapter_norm)[0])
        tokens.append(tok)
        confs.append(conf)
    return (torch.cat(exits, 1), torch.cat(ys, 1), torch.cat(tokens, 1), torch.cat(confs, 1), engine)


@pytest.mark.parametrize("variant,architecture", [
    (dict(family="llama"), "kangaroo"), (dict(family="qwen2", tied=True), "kangaroo"),
    (dict(family="llama", heads=2, kv_heads=2, head_dim=48), "kangaroo"), (dict(family="llama", rope="llama3"), "kangaroo"),
    (dict(family="llama"), "decoder"), (dict(family="qwen2", tied=True), "decoder2")])
@torch.no_grad()
def test_adapter_forward_matches_engine_steps(variant, architecture):
    model = tiny_model(**variant)
    spec = model_spec(model)
    adapter = kx.Adapter.for_model(model, exit_layer=2, init="random", seed=3, architecture=architecture)
    ids = torch.randint(0, VOCAB, (1, 21))
    exits, want_y, want_tok, want_conf, engine = engine_adapter_steps(model, adapter, ids)
    T = ids.shape[1]
    y = adapter(exits, torch.arange(T)[None], engine.rope_cos, engine.rope_sin, scale=spec.attn_scale)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    tok, conf = reference.lm_head_argmax(y, spec.lm_head)
    assert torch.equal(tok, want_tok)
    torch.testing.assert_close(conf, want_conf, rtol=1e-5, atol=1e-5)

    # Left padding (attention_mask + positions) and right padding leave the real positions unchanged.
    pad = 5
    junk = torch.randn(1, pad, exits.shape[2]) * 50
    left = adapter(torch.cat([junk, exits], 1), torch.cat([torch.zeros(1, pad, dtype=torch.long),
                                                           torch.arange(T)[None]], 1),
                   engine.rope_cos, engine.rope_sin, attention_mask=torch.tensor([[0] * pad + [1] * T]),
                   scale=spec.attn_scale)
    torch.testing.assert_close(left[:, pad:], want_y, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(left).all()
    right = adapter(torch.cat([exits, junk], 1), torch.arange(T + pad)[None], engine.rope_cos, engine.rope_sin,
                    scale=spec.attn_scale)
    torch.testing.assert_close(right[:, :T], want_y, rtol=1e-5, atol=1e-5)


def test_teacher_exit_states_and_targets_match_engine(distilled):
    model, spec, seqs, cache, _ = distilled
    engine = Engine(spec)
    for i in (0, 3, len(seqs) - 1):
        ids = torch.tensor([seqs[i][0] + seqs[i][1]])
        T = ids.shape[1]
        engine.reserve(T + 1, 1)
        pos = torch.arange(T)[None]
        rows = cache.seq_start[i] + torch.arange(T)
        for ell in (1, 2):
            x, res = engine.run_layers(F.embedding(ids, spec.embed), pos, 0, ell)
            _, h_exit = ops.fused_add_rms_norm(x, res, spec.layers[ell].input_norm, spec.rms_norm_eps)
            torch.testing.assert_close(cache.exit_states[ell][rows], h_exit[0], rtol=1e-5, atol=1e-5)
        # Targets: the model's own next-token distribution at the answer positions.
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0].float(), -1)
        first = len(seqs[i][0]) - 1
        trows = cache.loss_start[i] + torch.arange(T - 1 - first)
        want_p, want_idx = probs[first:T - 1].topk(16, dim=-1)
        torch.testing.assert_close(cache.target_prob[trows], want_p, rtol=1e-5, atol=1e-6)
        assert torch.equal(cache.teacher_top1[trows], probs[first:T - 1].argmax(-1))


def test_distill_loss_top_k_with_rest_equals_full_softmax_when_k_covers_the_mass():
    logits, teacher = torch.randn(5, 30), torch.randn(5, 30) * 3
    p = torch.softmax(teacher, -1)
    full = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()

    class Targets:
        top_k = 29
    t = Targets()
    t.target_prob, t.target_idx = p.topk(29, dim=-1)
    rows = torch.arange(5)
    # k = V-1: the rest bucket is exactly the one token left out, so the loss is the full cross-entropy.
    torch.testing.assert_close(draft.distill_loss(logits, t, rows, None), full, rtol=1e-5, atol=1e-6)


def test_full_softmax_targets(distilled):
    """top_k=0 keeps the teacher's final states and recomputes its full softmax: a student equal to the
    teacher scores the teacher's entropy, and training on these targets runs."""
    model, spec, seqs, _, rope = distilled
    cache = data.teacher_pass(model, seqs[:4], [1], top_k=0, loss_on_prompt=True, tokens_per_batch=64,
                              progress=False)
    assert cache.num_targets == sum(len(p) + len(a) - 1 for p, a in seqs[:4])  # loss_on_prompt: every position
    rows = torch.arange(cache.num_targets)
    teacher_logits = F.linear(cache.target_hidden, spec.lm_head)
    p = torch.softmax(teacher_logits, -1)
    entropy = -(p * torch.log_softmax(teacher_logits, -1)).sum(-1).mean()
    torch.testing.assert_close(draft.distill_loss(teacher_logits, cache, rows, spec.lm_head), entropy)
    _, run = training.train_layer(spec, cache, 1, torch.arange(4), rope, opts(steps=3), None, {})
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in run["history"])


# ---- training: learns, frozen target, deterministic, resumable, round-trips ---------------------------

def test_training_lowers_the_loss_and_leaves_the_target_alone(distilled):
    model, spec, seqs, cache, rope = distilled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(cache.num_sequences)
    start = kx.Adapter.for_model(model, 1, init="next_layer")
    m0 = evaluation.teacher_forced_metrics(start, spec, cache, 1, ids, 4, rope)
    with pipeline._frozen(model):
        adapter, run = training.train_layer(spec, cache, 1, ids, rope, opts(steps=30), None, {})
    m1 = evaluation.teacher_forced_metrics(adapter, spec, cache, 1, ids, 4, rope)
    # The loss is a cross-entropy: its floor is the teacher's entropy (top-k + rest). What training can
    # remove is the KL above that floor; most of it must go, and agreement must rise.
    p = cache.target_prob.double()
    rest = (1 - p.sum(-1)).clamp_min(1e-12)
    floor = float((-(p * p.clamp_min(1e-12).log()).sum(-1) - rest * rest.log()).mean())
    assert m1["loss"] - floor < 0.5 * (m0["loss"] - floor), (floor, m0, m1)
    assert m1["top1_agreement"] > m0["top1_agreement"] + 0.2, (m0, m1)
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # restored by _frozen
    assert all(p.grad is not None and p.dtype == torch.float32 for p in adapter.parameters())


def test_same_seed_same_weights_and_resume_equals_uninterrupted(distilled, tmp_path, monkeypatch):
    _, spec, _, cache, rope = distilled
    ids = torch.arange(cache.num_sequences)
    a, _ = training.train_layer(spec, cache, 2, ids, rope, opts(), None, {})
    b, _ = training.train_layer(spec, cache, 2, ids, rope, opts(), None, {})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = training.train_layer(spec, cache, 2, ids, rope, opts(seed=1), None, {})
    assert not torch.equal(a.q_proj.weight, c.q_proj.weight)

    class Killed(Exception):
        pass
    ckpt = str(tmp_path / "checkpoint" / "layer-2.pt")
    save = loop.save_checkpoint

    def save_then_die(path, adapter, optimizer, scheduler, step, *rest):
        save(path, adapter, optimizer, scheduler, step, *rest)
        if step == 8:
            raise Killed
    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        training.train_layer(spec, cache, 2, ids, rope, opts(), ckpt, {"k": 1})
    assert torch.load(ckpt, weights_only=True)["step"] == 8
    with pytest.raises(ValueError, match="other training options"):
        training.train_layer(spec, cache, 2, ids, rope, opts(resume=True, out_dir="x"), ckpt, {"k": 2})
    resumed, run = training.train_layer(spec, cache, 2, ids, rope, opts(resume=True, out_dir="x"), ckpt, {"k": 1})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), resumed.state_dict().values()))
    assert run["history"][-1]["step"] == 12 and not os.path.exists(ckpt)


def test_save_load_round_trip(distilled, tmp_path):
    model, spec, _, cache, rope = distilled
    adapter, _ = training.train_layer(spec, cache, 1, torch.arange(4), rope, opts(steps=3), None, {})
    adapter.config.update(trained=True, training={"steps": 3, "seed": 0})
    adapter.save_pretrained(tmp_path / "a")
    back = kx.Adapter.from_pretrained(tmp_path / "a")
    assert back.config == json.loads(json.dumps(adapter.config)) and back.config["trained"]
    assert all(torch.equal(x, y) for x, y in zip(adapter.state_dict().values(), back.state_dict().values()))
    batch = cache.batch(torch.tensor([0, 1]), 1)
    with torch.no_grad():
        torch.testing.assert_close(back(batch.exit_hidden, batch.positions, *rope),
                                   adapter(batch.exit_hidden, batch.positions, *rope))


# ---- data handling and the command line ------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_bad_records_are_counted(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"id": 1, "prompt": "fine"}), "{not json", json.dumps({"id": 2}), json.dumps({"prompt": ""}),
        json.dumps({"prompt": "  \n"}), json.dumps({"prompt": 7}), json.dumps(["a list"]), "",
        json.dumps({"prompt": "x" * 80}), json.dumps({"prompt": "also\u2028fine"}, ensure_ascii=False)])
    texts, skipped = io.read_prompts(f, strict=False)
    ids, examined = data.encode_prompts(FakeTokenizer(), texts, 40, 10, skipped)
    assert len(ids) == 2 and examined == 3 and texts[-1] == "also\u2028fine"  # U+2028 is no line break in JSONL
    assert skipped == {"malformed_json": 1, "missing_prompt": 1, "empty_prompt": 2, "prompt_not_a_string": 1,
                       "not_an_object": 1, "too_long": 1}


def test_cli_errors_on_missing_or_unreadable_files(tmp_path, capsys):
    good = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "hi"})])
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00bad")
    cases = [(["--prompts", str(tmp_path / "missing.jsonl")], "not found"),
             (["--prompts", str(tmp_path)], "is a directory"),
             (["--prompts", str(tmp_path / "bin.jsonl")], "not UTF-8"),
             (["--prompts", good, "--mt-bench", str(tmp_path / "nope.jsonl")], "not found"),
             (["--prompts", good, "--ship"], "--mt-bench")]
    for args, message in cases:
        argv = ["train"] + args + ["--out", str(tmp_path / "out")]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_parse_exit_layers():
    assert training.parse_exit_layers("4, 1,2", 6) == [1, 2, 4]
    assert training.parse_exit_layers(3, 6) == [3]
    for bad in ("0", "6", "a", []):
        with pytest.raises(ValueError):
            training.parse_exit_layers(bad, 6)


# ---- the whole pipeline: CLI -> generation -> teacher -> training -> sweep -> report -> ship ----------

def test_pipeline_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    monkeypatch.setattr(cli, "load_model", lambda name, device, dtype: (model, FakeTokenizer()))
    monkeypatch.setattr("kangaroo_ext.default_model.ADAPTER_DIR", str(tmp_path / "shipped"))
    lines = [json.dumps({"id": i, "prompt": f"question {i}: what is {i} + {i}?"}) for i in range(9)]
    prompts_file = write_lines(tmp_path / "p.jsonl", lines[:4] + ["{broken", json.dumps({"prompt": ""})] + lines[4:])
    mt = write_lines(tmp_path / "mt.jsonl", [json.dumps({"question_id": i, "category": c, "turns": [f"tell {i}", "x"]})
                                             for i, c in enumerate("aabbc")])
    out = tmp_path / "run"
    argv = ["train", "--prompts", prompts_file, "--out", str(out), "--exit-layer", "1,3", "--num-prompts", "8",
            "--max-new-tokens", "10", "--steps", "6", "--batch-size", "3", "--checkpoint-every", "2",
            "--mt-bench", mt, "--eval-questions", "2", "--eval-max-new-tokens", "8", "--eval-warmup", "0",
            "--thresholds", "0,0.5", "--max-draft", "3", "--holdout-fraction", "0.25", "--no-progress", "--ship"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["skipped"] == {"malformed_json": 1, "empty_prompt": 1} and report["data"]["used"] == 8
    assert report["generation"]["sequences"] == 8 and report["teacher"]["holdout_sequences"] == 2
    table = report["eval"]["table"]
    assert [(r["exit_layer"], r["threshold"]) for r in table] == [(1, 0.0), (1, 0.5), (3, 0.0), (3, 0.5)]
    assert all(r["identical_to_plain"] == 2 for r in table)  # lossless, fp32
    assert all(len(r["acceptance_by_position"]) == 3 and r["tau"] >= 1.0 and r["speedup"] > 0 for r in table)
    assert any(r["acceptance_by_position"][0] is not None for r in table)
    best = report["best"]
    assert best["speedup"] == max(r["speedup"] for r in table)
    for ell in (1, 3):
        config = json.loads((out / f"layer-{ell}" / "adapter_config.json").read_text())
        assert config["trained"] and config["exit_layer"] == ell and config["training"]["steps"] == 6
        assert 0 <= report["holdout"][str(ell)]["raw_exit_top1_agreement"] <= 1
    assert not list((out / "checkpoint").glob("*.pt"))
    assert (out / "curves.png").stat().st_size > 1000
    card = (out / "MODEL_CARD.md").read_text()
    assert "Speed sweep" in card and f"ℓ = {best['exit_layer']}" in card
    shipped = json.loads((tmp_path / "shipped" / "adapter_config.json").read_text())
    assert shipped["recommended_threshold"] == best["threshold"] and shipped["exit_layer"] == best["exit_layer"]
    assert (tmp_path / "shipped" / "MODEL_CARD.md").exists()

    # --resume: reuses the answers and the finished layers; nothing is generated or trained again.
    monkeypatch.setattr(data, "generate_answers", lambda *a, **k: pytest.fail("regenerated"))
    monkeypatch.setattr(pipeline, "train_layer", lambda *a, **k: pytest.fail("retrained"))
    assert cli.main(argv[:-1] + ["--resume", "--eval-questions", "0"]) == 0, capsys.readouterr().err


# ---- architectures, reduced draft vocabulary, learning curves ----------------------------------------

def test_a_vocabulary_holding_every_token_changes_nothing(distilled):
    model, spec, _, cache, rope = distilled
    vocab = draft.DraftVocab.from_ids(torch.randperm(VOCAB), VOCAB)
    adapter = kx.Adapter.for_model(model, exit_layer=1, init="random", seed=2)
    rows_batch = cache.batch(torch.arange(4), 1)
    with torch.no_grad():
        full = draft.student_logits(adapter, spec, rows_batch, rope, spec.lm_head)
        sub = draft.student_logits(adapter, spec, rows_batch, rope, draft.draft_head(spec, vocab))
        torch.testing.assert_close(sub, full[:, vocab.ids])
        torch.testing.assert_close(draft.distill_loss(sub, cache, rows_batch.target_rows, spec.lm_head, vocab),
                                   draft.distill_loss(full, cache, rows_batch.target_rows, spec.lm_head))
        assert torch.equal(draft.proposed(sub, vocab), full.argmax(-1))


@pytest.mark.parametrize("architecture,n", [("kangaroo", 30), ("decoder", 0), ("decoder2", 50)])
def test_training_any_architecture_and_vocabulary_learns_and_stays_lossless(distilled, architecture, n):
    model, spec, seqs, cache, rope = distilled
    ids = torch.arange(cache.num_sequences)
    vocab = draft.DraftVocab.most_frequent((a for _, a in seqs), n, VOCAB) if n else None
    o = opts(steps=24, architecture=architecture, draft_vocab=n, eval_every=8)
    adapter, run = training.train_layer(spec, cache, 2, ids[2:], rope, o, None, {}, hold_ids=ids[:2], vocab=vocab)
    assert adapter.architecture == architecture and (adapter.config.get("draft_vocab_size") or 0) == n
    curve = [h for h in run["history"] if "heldout_loss" in h]
    assert [h["step"] for h in curve] == [8, 16, 24] and all(h["tokens_seen"] > 0 for h in curve)
    assert curve[0]["tokens_seen"] < curve[-1]["tokens_seen"]
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    with torch.inference_mode():
        draft_model = adapter.to(spec.dtype).eval()
        for p in prompts(2, seed=9):
            ref = kx.generate(model, p, max_new_tokens=16, eos_token_id=[]).sequences
            out = kx.speculative_generate(model, p, adapter=draft_model, max_new_tokens=16, threshold=0.0,
                                          eos_token_id=[])
            assert torch.equal(out.sequences, ref)


def test_draft_vocab_is_the_most_frequent_answer_tokens():
    v = draft.DraftVocab.most_frequent([[5, 5, 7, 9], [7, 5, 1]], 3, 12)
    assert v.ids.tolist() == [5, 7, 1]  # 5 (3x), 7 (2x), then ties by id: 1 before 9
    assert v.inv[5] == 0 and v.inv[9] == -1 and v.covers(torch.tensor([1, 9])).tolist() == [True, False]


def test_an_interrupted_generation_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    model = tiny_model("llama")
    records = [{"prompt": f"question {i}: what is {i} times {i + 1}?"} for i in range(9)]
    base = dict(num_prompts=9, max_new_tokens=6, gen_batch_size=2, progress=False, verbose=False)
    clean, _, _ = data.distill_sequences(model, FakeTokenizer(), records, opts(**base), "fp", lambda *a: None)
    real = data.generate_answers

    def dies_after_two_batches(*args, on_batch=None, **kw):
        calls = []

        def save_then_maybe_die(answers):
            on_batch(answers)
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(*args, on_batch=save_then_maybe_die, **kw)
    path = str(tmp_path / "answers.pt")
    monkeypatch.setattr(data, "generate_answers", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        data.distill_sequences(model, FakeTokenizer(), records, opts(data_file=path, **base), "fp", lambda *a: None)
    assert not torch.load(path, weights_only=True)["complete"]
    monkeypatch.setattr(data, "generate_answers", real)
    resumed, _, gen = data.distill_sequences(model, FakeTokenizer(), records,
                                             opts(data_file=path, resume=True, **base), "fp", lambda *a: None)
    assert 2 <= gen["resumed_answers"] <= 4 and resumed == clean  # two batches of at most 2 were kept
    again, _, gen = data.distill_sequences(model, FakeTokenizer(), records, opts(data_file=path, resume=True, **base),
                                           "fp", lambda *a: None)
    assert gen.get("reused") and again == clean


def one_second_per_call(monkeypatch):
    """The generation's clock moves one second each time it is read: time limits without waiting."""
    clock = [0.0]

    def fake_clock():
        clock[0] += 1.0
        return clock[0]
    monkeypatch.setattr(data.time, "perf_counter", fake_clock)


def test_generate_only_runs_resume_until_every_prompt_is_answered(tmp_path, monkeypatch):
    """A time-limited machine: each call answers what fits its time limit and saves; the next --resume
    continues; the finished file equals one uninterrupted generation, and training then reuses it."""
    model = tiny_model("llama")
    records = [{"prompt": f"question {i}: what is {i} times {i + 1}?"} for i in range(9)]
    base = dict(num_prompts=9, max_new_tokens=6, gen_batch_size=2, progress=False, verbose=False)
    clean, _, _ = data.distill_sequences(model, FakeTokenizer(), records, opts(**base), "fp", lambda *a: None)
    one_second_per_call(monkeypatch)
    path = str(tmp_path / "answers.pt")
    call = dict(base, data_file=path, generate_only=True, resume=True, generation_time_limit=2.5)
    counts = []
    for _ in range(10):
        sequences, _, gen = data.distill_sequences(model, FakeTokenizer(), records, opts(**call), "fp",
                                                   lambda *a: None)
        counts.append(len(sequences))
        if torch.load(path, weights_only=True)["complete"]:
            break
    assert counts[0] < 9 and counts[-1] == 9 and len(counts) > 1
    assert sequences == clean



def test_training_on_the_answers_there_leaves_the_file_resumable(tmp_path, monkeypatch):
    """generation_time_limit=0 takes the answers already in a partial data file and generates nothing; the
    file stays partial (complete=False, the same answers), so a later --resume still answers the rest."""
    model = tiny_model("llama")
    records = [{"prompt": f"question {i}: what is {i} plus {i + 2}?"} for i in range(8)]
    base = dict(num_prompts=8, max_new_tokens=5, gen_batch_size=2, progress=False, verbose=False)
    one_second_per_call(monkeypatch)
    path = str(tmp_path / "answers.pt")
    partial, _, _ = data.distill_sequences(model, FakeTokenizer(), records,
                                           opts(data_file=path, generate_only=True, resume=True,
                                                generation_time_limit=1.5, **base), "fp", lambda *a: None)
    saved = torch.load(path, weights_only=True)
    assert not saved["complete"] and 0 < len(partial) < 8
    got, _, gen = data.distill_sequences(model, FakeTokenizer(), records,
                                         opts(data_file=path, reuse_data=True, generation_time_limit=0, **base),
                                         "fp", lambda *a: None)
    assert got == partial and gen["new_tokens"] == 0 and gen["stopped_by_time_limit"]
    after = torch.load(path, weights_only=True)
    assert not after["complete"] and torch.equal(after["answered"], saved["answered"])
