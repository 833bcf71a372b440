"""Training data (issue 20): answers reused by the prompt file's content, not its path; repetition loops
found and cut without touching an answer that does not loop. CPU, tiny models."""
import json
import random
import shutil

import pytest
import torch

from kangaroo_ext.training import data, loops

from models import tiny_model
from test_training import FakeTokenizer, opts, write_lines

BASE = dict(num_prompts=6, max_new_tokens=5, gen_batch_size=3, progress=False, verbose=False)


def quiet(*a):
    pass


# ---- answers matched by the prompt file's sha256 ---------------------------------------------------

@pytest.fixture()
def answered(tmp_path):
    """A prompt file, the tiny model's saved answers to it (complete), and the answers themselves."""
    model = tiny_model("llama")
    prompts = write_lines(tmp_path / "prompts.jsonl",
                          [json.dumps({"prompt": f"question {i}: what is {i} plus {i}?"}) for i in range(6)])
    answers = str(tmp_path / "answers.pt")
    seqs, _, _ = data.distill_sequences(model, FakeTokenizer(), prompts, opts(data_file=answers, **BASE), "fp", quiet)
    return model, tmp_path, prompts, answers, seqs


def never_generate(*a, **k):
    raise AssertionError("answers were generated again instead of reused")


def test_a_moved_and_renamed_prompt_file_reuses_the_answers(answered, monkeypatch):
    model, tmp_path, prompts, answers, seqs = answered
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.move(prompts, moved)
    monkeypatch.setattr(data, "generate_answers", never_generate)
    again, _, gen = data.distill_sequences(model, FakeTokenizer(), str(moved),
                                           opts(data_file=answers, reuse_data=True, **BASE), "fp", quiet)
    assert gen.get("reused") and again == seqs


def test_a_changed_prompt_file_is_refused_naming_what_changed(answered, monkeypatch):
    model, tmp_path, prompts, answers, _ = answered
    with open(prompts, "a") as f:  # one more prompt: same path, other content
        f.write(json.dumps({"prompt": "a new question"}) + "\n")
    monkeypatch.setattr(data, "generate_answers", never_generate)
    with pytest.raises(ValueError, match=r"prompt file's content changed.*source: saved .*'sha256'"):
        data.distill_sequences(model, FakeTokenizer(), prompts, opts(data_file=answers, reuse_data=True, **BASE),
                               "fp", quiet)
    # An edit that keeps the size (one character swapped) changes the sha256 all the same.
    text = open(prompts).read().replace("a new question", "")
    open(prompts, "w").write(text.replace("question 3", "question 4", 1))
    with pytest.raises(ValueError, match="prompt file's content changed"):
        data.distill_sequences(model, FakeTokenizer(), prompts, opts(data_file=answers, resume=True, **BASE),
                               "fp", quiet)


def test_same_size_edit_changes_the_identity(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"prompt": "abc"})])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"prompt": "abd"})])
    c = write_lines(tmp_path / "c.jsonl", [json.dumps({"prompt": "abc"})])
    ia, ib, ic = (data.prompt_file_identity(p) for p in (a, b, c))
    assert ia["bytes"] == ib["bytes"] and ia["sha256"] != ib["sha256"] and ia == ic


def test_other_settings_are_named(answered, monkeypatch):
    model, _, prompts, answers, _ = answered
    monkeypatch.setattr(data, "generate_answers", never_generate)
    with pytest.raises(ValueError, match=r"max_new_tokens: saved 5, now 7") as err:
        data.distill_sequences(model, FakeTokenizer(), prompts,
                               opts(data_file=answers, reuse_data=True, **dict(BASE, max_new_tokens=7)), "fp", quiet)
    assert "content changed" not in str(err.value)


def test_a_legacy_file_naming_its_prompts_by_path_gets_the_clear_message(answered, monkeypatch):
    model, _, prompts, answers, _ = answered
    saved = torch.load(answers, weights_only=True)
    saved["settings"]["source"] = {"file": "train_prompts.jsonl"}  # as the shared/data file was written
    torch.save(saved, answers)
    monkeypatch.setattr(data, "generate_answers", never_generate)
    with pytest.raises(ValueError, match=r"names its prompt file only by path.*sha256.*prompt_file_identity"):
        data.distill_sequences(model, FakeTokenizer(), prompts, opts(data_file=answers, reuse_data=True, **BASE),
                               "fp", quiet)
    now = dict(saved["settings"], source=data.prompt_file_identity(prompts))
    with pytest.raises(ValueError, match="only by path"):
        data.check_same_settings("x.pt", saved["settings"], now)
    data.check_same_settings("x.pt", now, dict(now))  # equal settings pass


# ---- repetition loops --------------------------------------------------------------------------------

def looping(rng, prefix_len, period, total):
    """A random prefix, then one random period repeated to `total` tokens (a greedy loop to the cap)."""
    prefix = [rng.randrange(1000, 2000) for _ in range(prefix_len)]
    unit = [rng.randrange(1, 999) for _ in range(period)]
    return prefix + [unit[i % period] for i in range(total - prefix_len)]


def test_looping_suffix_finds_the_loop_start_and_period():
    rng = random.Random(0)
    for prefix_len, period in ((0, 1), (5, 1), (40, 7), (100, 30), (3, 64)):
        a = looping(rng, prefix_len, period, 400)
        assert loops.looping_suffix(a) == loops.LoopSpan(prefix_len, period), (prefix_len, period)
        kept = loops.cut_loop(a, keep_periods=2)
        assert kept == a[:prefix_len + 2 * period]
    # A period whose first tokens continue the prefix by chance: the loop starts where the periodicity does.
    a = [7, 8, 9] + [1, 2, 9] * 40
    assert loops.looping_suffix(a) == loops.LoopSpan(2, 3)


def test_cutting_never_touches_an_answer_that_does_not_loop():
    rng = random.Random(1)
    answers = [[rng.randrange(0, 500) for _ in range(rng.randrange(1, 1024))] for _ in range(60)]
    # Repetition below the thresholds: a sentence said twice, a period shorter than 3 repeats or 48 tokens,
    # a loop broken before the end, an empty answer.
    sentence = [rng.randrange(1, 999) for _ in range(40)]
    answers += [sentence + sentence, [5, 6] * 20, list(range(100)) + [9] * 47,
                looping(rng, 10, 6, 300) + [4242], looping(rng, 0, 90, 260), []]
    for a in answers:
        assert loops.looping_suffix(a) is None, a[-20:]
        assert loops.cut_loop(a, keep_periods=1) is a
    pairs = [([1, 2], a) for a in answers]
    cut, removed, n_cut = loops.cut_loops(pairs, keep_periods=1)
    assert cut == pairs and removed == 0 and n_cut == 0
    # ...while a looping answer among them is cut, and only it.
    loop = looping(rng, 20, 5, 1024)
    cut, removed, n_cut = loops.cut_loops(pairs + [([3], loop)], keep_periods=2)
    assert cut[:-1] == pairs and cut[-1] == ([3], loop[:30]) and removed == 1024 - 30 and n_cut == 1


def test_torch_form_equals_the_reference():
    rng = random.Random(2)
    answers = [looping(rng, rng.randrange(0, 200), rng.randrange(1, 80), rng.randrange(200, 600)) for _ in range(40)]
    answers += [[rng.randrange(0, 5) for _ in range(rng.randrange(0, 300))] for _ in range(40)]  # chance repeats
    answers += [[3] * n for n in range(0, 60)]
    ref = [loops.looping_suffix(a) for a in answers]
    assert loops.looping_suffix_batch(answers) == ref
    assert sum(r is not None for r in ref) > 40  # the comparison covers loops, not only None


def test_repeated_ngram_mask():
    assert loops.repeated_ngram_mask([1, 2, 3, 1, 2, 3, 4], 3) == [False] * 3 + [True] * 3 + [False]
    assert loops.repeated_ngram_mask([1, 2, 1, 2, 1], 2) == [False, False, True, True, True]
    assert not any(loops.repeated_ngram_mask(list(range(50)), 1))
    mask = loops.repeated_target_mask([([9, 9], [1, 2, 1, 2]), ([5], [7])], loss_on_prompt=True, n=2)
    assert mask.tolist() == [False, False, False, True, True, False]  # prompt targets: never looping


def test_loop_argument_errors():
    with pytest.raises(ValueError, match="keep_periods must be an int >= 1"):
        loops.cut_loop([1, 2], keep_periods=0)
    with pytest.raises(ValueError, match="1-D"):
        loops.looping_suffix(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="n must be >= 1"):
        loops.repeated_ngram_mask([1], 0)


# ---- length-grouped batches ----------------------------------------------------------------------------

def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 1000, (203,), generator=gen)
    train_ids = torch.arange(3, 203)                     # 200 sequences: 12 full batches of 16 per epoch
    padded = {}
    for grouped in (False, True):
        kw = dict(lengths=lengths, group=4) if grouped else {}
        epoch = [data.batch_sequences(train_ids, 16, 5, s, **kw) for s in range(12)]
        flat = torch.cat(epoch)
        assert len(flat) == 192 and len(set(flat.tolist())) == 192 and set(flat.tolist()) <= set(train_ids.tolist())
        again = [data.batch_sequences(train_ids, 16, 5, s, **kw) for s in range(12)]
        assert all(torch.equal(a, b) for a, b in zip(epoch, again))       # a function of (seed, step) alone
        nxt = torch.cat([data.batch_sequences(train_ids, 16, 5, s, **kw) for s in range(12, 24)])
        assert not torch.equal(nxt, flat)                                 # a fresh order each epoch
        padded[grouped] = sum(int(lengths[b].max()) * len(b) for b in epoch)
    assert padded[True] < 0.75 * padded[False], padded
