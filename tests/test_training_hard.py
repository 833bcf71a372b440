"""Hard-label training (issue 20, the CPU route): the exit pass runs only the first ℓ layers and gives the
teacher pass's exit states; the labels are the answers' next tokens; with a one-hot teacher, soft-label and
hard-label training end with the same adapter; the disk cache resumes; the CLI runs it. CPU, tiny models."""
import json

import pytest
import torch

from kangaroo_ext import cli
from kangaroo_ext.engine.spec import model_spec
from kangaroo_ext.training import data, draft, hard_labels, loop, pipeline

from models import tiny_model
from test_training import FakeTokenizer, opts, sample_sequences, write_lines


@pytest.fixture(scope="module")
def both():
    model = tiny_model("llama")
    seqs = sample_sequences(model)
    soft = data.teacher_pass(model, seqs, [1, 2], top_k=4, loss_on_prompt=False, tokens_per_batch=64, progress=False)
    hard, stats = hard_labels.build_cache(model, seqs, [1, 2], False, 64, progress=False)
    spec = model_spec(model)
    return model, spec, seqs, soft, hard, loop.rope_tables(spec, int(soft.seq_len.max()))


def test_exit_pass_equals_the_teacher_pass_and_labels_are_next_tokens(both):
    model, _, seqs, soft, hard, _ = both
    for ell in (1, 2):
        torch.testing.assert_close(hard.exit_states[ell], soft.exit_states[ell], rtol=1e-5, atol=1e-5)
    want = torch.tensor([t for p, a in seqs for t in a])  # targets of positions len(p)-1 .. L-2
    assert torch.equal(hard.teacher_top1, want)
    # The model's own greedy answers: its argmax is the next answer token at every answer position.
    assert torch.equal(soft.teacher_top1, want)


def test_exit_pass_runs_only_the_first_layers(both, monkeypatch):
    model = both[0]
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.model.layers)]
    try:
        hard_labels.exit_states(model, torch.tensor([[5, 6, 7]]), [1, 2])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    with pytest.raises(ValueError, match=r"exit_layers must lie in \[1, 5\]"):
        hard_labels.exit_states(model, torch.tensor([[5]]), [6])


def one_hot_teacher(soft: data.DistillCache, labels: torch.Tensor) -> data.DistillCache:
    """The soft cache with its teacher made one-hot at `labels`: top-k lists the label first, then other
    tokens with probability 0 (no rest bucket)."""
    k = soft.top_k
    others = (labels[:, None] + 1 + torch.arange(k - 1)[None, :]) % 111
    soft.target_idx = torch.cat([labels[:, None], others], 1).int()
    soft.target_prob = torch.zeros(len(labels), k)
    soft.target_prob[:, 0] = 1.0
    soft.teacher_top1 = labels.clone()
    return soft


@pytest.mark.parametrize("vocab_size", [0, 12])
def test_hard_and_soft_training_end_equal_when_the_teacher_is_one_hot(both, vocab_size):
    model, spec, seqs, soft, hard, rope = both
    vocab = draft.DraftVocab.most_frequent((a for _, a in seqs), vocab_size, 111) if vocab_size else None
    if vocab is not None:
        assert not bool(vocab.covers(hard.teacher_top1).all())  # some labels fall outside: skipped by both
    ids = torch.arange(hard.num_sequences)
    o = opts(steps=10)
    a_hard, _ = loop.train_layer(spec, hard, 1, ids, rope, o, None, {}, vocab=vocab)
    soft_original = soft.target_idx.clone(), soft.target_prob.clone(), soft.teacher_top1.clone()
    try:
        # Before the teacher is made one-hot, the soft run ends elsewhere: the comparison can fail.
        a_soft, _ = loop.train_layer(spec, soft, 1, ids, rope, o, None, {}, vocab=vocab)
        assert not torch.allclose(a_soft.q_proj.weight, a_hard.q_proj.weight, atol=1e-4)
        one_hot_teacher(soft, hard.teacher_top1)
        a_soft, _ = loop.train_layer(spec, soft, 1, ids, rope, o, None, {}, vocab=vocab)
    finally:
        soft.target_idx, soft.target_prob, soft.teacher_top1 = soft_original
    for (name, x), y in zip(a_hard.state_dict().items(), a_soft.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_hard_label_loss_is_cross_entropy_and_checks_shapes():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 6, 3, 3, 1])
    torch.testing.assert_close(draft.hard_label_loss(logits, labels),
                               -torch.log_softmax(logits, -1)[torch.arange(5), labels].mean())
    vocab = draft.DraftVocab.from_ids(torch.tensor([3, 1]), 7)
    kept = torch.log_softmax(logits[:, :2], -1)
    want = -(kept[2, 0] + kept[3, 0] + kept[4, 1]) / 3  # labels 0 and 6 lie outside: skipped
    torch.testing.assert_close(draft.hard_label_loss(logits[:, :2], labels, vocab), want)
    with pytest.raises(ValueError, match=r"logits must be \[n, N\] and labels \[n\]"):
        draft.hard_label_loss(logits, labels[:3])


def test_disk_cache_is_float16_resumes_and_is_reused(both, tmp_path, monkeypatch):
    model, _, seqs, _, memory, _ = both
    real = hard_labels.exit_states
    calls = []

    def dies_on_third_batch(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(hard_labels, "exit_states", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        hard_labels.build_cache(model, seqs, [1, 2], False, 64, cache_dir=str(tmp_path), model_fingerprint="fp",
                                progress=False)
    monkeypatch.setattr(hard_labels, "exit_states", real)
    disk, stats = hard_labels.build_cache(model, seqs, [1, 2], False, 64, cache_dir=str(tmp_path),
                                          model_fingerprint="fp", progress=False)
    assert stats["reused_batches"] == 2 and 0 < stats["computed_tokens"] < stats["tokens"]
    for ell in (1, 2):
        assert disk.exit_states[ell].dtype == torch.float16
        torch.testing.assert_close(disk.exit_states[ell].float(), memory.exit_states[ell], rtol=2e-3, atol=2e-3)
    batch = disk.batch(torch.tensor([0, 3]), 2)
    assert batch.exit_hidden.dtype == torch.float32
    again, stats = hard_labels.build_cache(model, seqs, [1, 2], False, 64, cache_dir=str(tmp_path),
                                           model_fingerprint="fp", progress=False)
    assert stats["computed_tokens"] == 0 and torch.equal(again.exit_states[2], disk.exit_states[2])
    # Other sequences, layers or model: another key, another folder.
    keys = {hard_labels.cache_key("fp", seqs, [1, 2], False), hard_labels.cache_key("fp", seqs[:-1], [1, 2], False),
            hard_labels.cache_key("fp", seqs, [1], False), hard_labels.cache_key("fp2", seqs, [1, 2], False)}
    assert len(keys) == 4


def test_cli_trains_with_hard_labels_and_cut_loops(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    monkeypatch.setattr(cli, "load_model", lambda name, device, dtype: (model, FakeTokenizer()))
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": f"question {i}: {i} + {i}?"}) for i in range(8)])
    out = tmp_path / "run"
    argv = ["train", "--prompts", prompts, "--out", str(out), "--exit-layer", "1,2", "--num-prompts", "8",
            "--max-new-tokens", "60", "--steps", "4", "--batch-size", "3", "--checkpoint-every", "2",
            "--holdout-fraction", "0.25", "--labels", "hard", "--cut-loops", "2", "--no-progress"]
    monkeypatch.setattr(data, "teacher_pass", lambda *a, **k: pytest.fail("hard labels ran the full teacher pass"))
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["labels"] == "hard" and report["exit_pass"]["layers_run"] == 2
    assert report["teacher"]["targets"].startswith("hard labels")
    assert report["loops"]["keep_periods"] == 2 and report["loops"]["answers_cut"] > 0  # a tiny model loops
    assert list((out / pipeline.EXIT_CACHE_DIR).glob("*/layer-2.f16"))
    held = report["holdout"]["1"]
    assert set(held["by_text"]) == {"looping", "not_looping"}
    assert sum(v["tokens"] for v in held["by_text"].values()) == held["tokens"]
    config = json.loads((out / "layer-1" / "adapter_config.json").read_text())
    assert config["training"]["fingerprint"]["labels"] == "hard"
    # --resume: the finished layers and the exit cache are reused; nothing trains again.
    monkeypatch.setattr(pipeline, "train_layer", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(hard_labels, "exit_states", lambda *a, **k: pytest.fail("exit pass ran again"))
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(argv[:-4] + ["--labels", "argmax"])
