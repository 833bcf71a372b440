"""The torch library: schemas defined once and in sync with the build, fakes that let torch.compile
trace the ops, opcheck on every device where the ops have a kernel."""
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import kangaroo_ext
from kangaroo_ext import _extension
from kangaroo_ext.ops import schemas


def _sample_args(name, device):
    if name == "fused_add_rms_norm":
        return [(torch.randn(3, 577, device=device), torch.randn(3, 577, device=device),
                 torch.randn(577, device=device), 1e-5),
                (torch.randn(2, 4, 64, device=device, dtype=torch.float16), None,
                 torch.randn(64, device=device, dtype=torch.float16), 1e-6)]
    if name == "verify_accept":
        return [(torch.randint(0, 111, (3, 4), device=device), torch.randn(3, 5, 111, device=device),
                 torch.tensor([4, 0, 2], device=device)),
                (torch.randint(0, 32000, (1, 1), device=device), torch.randn(1, 2, 32000, device=device), None)]
    if name == "accept_greedy":
        target = torch.randint(0, 5, (3, 5), device=device)
        return [(target[:, :4].clone(), target, torch.tensor([4, 0, 2], device=device)),
                (torch.randint(0, 5, (1, 7), device=device), torch.randint(0, 5, (1, 8), device=device), None)]
    if name == "take_draft":
        def case(B, G, step, with_ids):
            ids = torch.randperm(50, device=device)[:7] if with_ids else None
            return (torch.randint(0, 7, (B, 1), device=device), torch.rand(B, 1, device=device),
                    torch.tensor(0.5, device=device), torch.arange(B, device=device) % 3 != 2,
                    torch.zeros(B, dtype=torch.int64, device=device), torch.zeros(B, G, dtype=torch.int64, device=device),
                    torch.zeros(B, G + 1, dtype=torch.int64, device=device), step, ids)
        return [case(3, 4, 1, True), case(1, 1, 0, False)]
    if name == "rope_append_attention":
        def case(B, T, Hq, Hkv, D, S, start, dtype):
            cos = torch.randn(S, D, device=device)
            pos = (start + torch.arange(T, device=device))[None].repeat(B, 1)
            return (torch.randn(B, T, Hq, D, device=device, dtype=dtype), torch.randn(B, T, Hkv, D, device=device, dtype=dtype),
                    torch.randn(B, T, Hkv, D, device=device, dtype=dtype), cos, cos.flip(0).contiguous(), pos,
                    torch.randn(B, Hkv, S, D, device=device, dtype=dtype), torch.randn(B, Hkv, S, D, device=device, dtype=dtype),
                    D ** -0.5, 0)
        return [case(1, 3, 4, 2, 16, 32, 5, torch.float32), case(2, 1, 6, 3, 64, 64, 40, torch.float16)]
    if name == "lm_head_argmax":
        return [(torch.randn(1, 2, 24, device=device), torch.randn(111, 24, device=device)),
                (torch.randn(3, 64, device=device, dtype=torch.float16), torch.randn(500, 64, device=device, dtype=torch.float16))]
    if name in ("rms_norm_linear", "rms_norm_gate_up", "decode_linear"):
        def case(M, K, Ns, dtype, residual, bias):
            x = torch.randn(M, K, device=device, dtype=dtype)
            ws = [torch.randn(n, K, device=device, dtype=dtype) for n in Ns]
            if name == "decode_linear":
                return (x, ws[0], torch.randn(Ns[0], device=device, dtype=dtype) if bias else None)
            res = torch.randn_like(x) if residual else None
            nw = torch.randn(K, device=device, dtype=dtype)
            if name == "rms_norm_gate_up":
                return (x, res, nw, 1e-5, ws[0], ws[1])
            return (x, res, nw, 1e-5, ws, [torch.randn(n, device=device, dtype=dtype) if bias else None for n in Ns])
        return [case(3, 72, (40, 40, 24), torch.float32, True, True),
                case(1, 64, (16, 16), torch.float16, False, False)]
    if name in ("sampling_probs", "sample_logits"):
        rng = torch.tensor([3, 4], device=device)
        cases = [(torch.randn(3, 111, device=device), 0.7, 5, 0.9),
                 (torch.randn(2, 3, 50, device=device, dtype=torch.float16), 1.0, 0, 1.0)]
        return cases if name == "sampling_probs" else [c + (rng, 2) for c in cases]
    if name == "speculative_sample_accept":
        def case(B, k, V, dtype, num_drafted):
            q = torch.softmax(torch.randn(B, k, V, device=device), -1)
            return (torch.randint(0, V, (B, k), device=device), q, torch.randn(B, k + 1, V, device=device, dtype=dtype),
                    num_drafted, 0.8, 5, 0.9, torch.tensor([1, 2], device=device))
        return [case(3, 4, 111, torch.float32, torch.tensor([4, 0, 2], device=device)),
                case(1, 1, 50, torch.float16, None)]
    if name == "accept_commit":
        from test_accept_commit import _case
        out = []
        for B, k in ((1, 0), (3, 4)):
            drafts, target, nd, st = _case(B, k, 1, device=device)
            out.append((drafts, target, nd, st["cache_len"], st["tokens_in"], st["history"], st["report"]))
        return out
    if name == "verify_tail":
        from test_accept_commit import _case
        from test_verify_tail import _rows
        out = []
        for B, T, dtype in ((1, 1, torch.float32), (2, 4, torch.float16)):
            x, res, w, head = _rows(B, T, 32, 50, dtype, device, 0)
            drafts, _, nd, st = _case(B, T - 1, 1, device=device)
            out.append((x, res, w, 1e-5, head, drafts, nd, st["cache_len"], st["tokens_in"], st["history"],
                        st["report"]))
        return out
    if name == "persistent_draft":
        from test_persistent_draft import eligible_model, _prepared
        from kangaroo_ext.engine.engine import engine_for
        import copy
        if device == "cpu":
            model = copy.deepcopy(eligible_model(layers=3, hidden=64, heads=2, kv_heads=1, inter=128, vocab=50))
        else:
            model = copy.deepcopy(eligible_model(layers=3)).to(torch.bfloat16).cuda()
        engine = _prepared(model, 2, 3, 0.2)
        return [engine._persistent_args(3, True), engine._persistent_args(2, False)]
    raise KeyError(name)


def test_every_op_is_defined_with_its_schema():
    parse = getattr(torch._C, "parse_schema", lambda schema: schema)   # private: may go away
    for name, op in schemas.OPS.items():
        got = schemas.compiled_schema(name)
        assert got == " ".join(str(parse("kangaroo::" + op.schema)).replace("kangaroo::", "").split())


def test_schema_check_without_torchs_private_parser(monkeypatch):
    monkeypatch.delattr(torch._C, "parse_schema")
    schemas.check_compiled_schemas()
    assert "parse_schema is unavailable" in schemas.SCHEMA_CHECK_NOTE
    monkeypatch.undo()
    schemas.check_compiled_schemas()
    assert schemas.SCHEMA_CHECK_NOTE == ""


def test_extension_built_when_demanded():
    if _extension.expected():
        assert _extension.loaded(), f"KANGAROO_FORCE_CUDA=1 but kangaroo_ext._C did not load: {_extension.LOAD_ERROR}"
        assert _extension.compiled_archs(), "the extension reports no compiled architectures"
    if not _extension.loaded():
        pytest.skip(f"extension not built here: {_extension.LOAD_ERROR}")
    schemas.check_compiled_schemas()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _extension.loaded() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(schemas.OPS))
def test_opcheck(name, device):
    if device == "cuda" and name in schemas.MISSING_FROM_EXTENSION:
        pytest.skip(f"this build of the extension has no CUDA kernel for {name}")
    for args in _sample_args(name, device):
        torch.library.opcheck(getattr(torch.ops.kangaroo, name).default, args)


def test_torch_compile_traces_through_the_ops():
    def step(x, r, w, drafts, logits):
        h, r2 = torch.ops.kangaroo.fused_add_rms_norm(x, r, w, 1e-5)
        acc, com = torch.ops.kangaroo.verify_accept(drafts, logits, None)
        return h.sum() + r2.sum(), acc, com

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    args = (torch.randn(2, 16), torch.randn(2, 16), torch.randn(16),
            torch.randint(0, 20, (1, 3)), torch.randn(1, 4, 20))
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)


def test_package_version_and_info_runs(capsys):
    from kangaroo_ext import info
    info.print_info()
    out = capsys.readouterr().out
    assert "torch" in out and "backends" in out and kangaroo_ext.__version__ in out


def test_info_shows_the_run_switches_in_effect(monkeypatch):
    """`kangaroo info` lists every run-time switch as on/off: defaults when unset, the environment when set."""
    from kangaroo_ext import info
    monkeypatch.delenv("KANGAROO_TENSOR_CORE_GEMV", raising=False)
    monkeypatch.delenv("KANGAROO_BATCH_INVARIANT_ATTENTION", raising=False)
    switches = info.collect()["run switches"]
    assert switches["tensor_core_gemv"] == "on" and switches["batch_invariant_attention"] == "on"
    monkeypatch.setenv("KANGAROO_TENSOR_CORE_GEMV", "0")
    assert info.collect()["run switches"]["tensor_core_gemv"] == "off"
    monkeypatch.setenv("KANGAROO_TENSOR_CORE_GEMV", "maybe")
    assert info.collect()["run switches"].startswith("invalid: KANGAROO_TENSOR_CORE_GEMV='maybe'")


# ---- the torch the extension was built for ---------------------------------------------------------

RUNNING = {"torch": "2.14.1+cu130", "cuda": "13.0", "cxx11_abi": "1"}
HINT = "rebuild with pip install --no-build-isolation -e ."


def test_mismatch_names_both_torches_in_one_line():
    assert _extension.mismatch(dict(RUNNING), RUNNING) == ""
    assert _extension.mismatch({}, RUNNING) == "", "a build that recorded nothing is not refused"
    assert _extension.mismatch(dict(RUNNING, torch="2.11.0+cu130"), RUNNING) == (
        f"kangaroo_ext._C was built for torch 2.11.0+cu130 but torch 2.14.1+cu130 is running: {HINT}")
    assert "CUDA 12.8" in _extension.mismatch(dict(RUNNING, cuda="12.8"), RUNNING)
    assert "_GLIBCXX_USE_CXX11_ABI=0" in _extension.mismatch(dict(RUNNING, cxx11_abi="0"), RUNNING)


def _fake_library(tmp_path, monkeypatch, record: bytes):
    """A file standing in for kangaroo_ext/_C*.so, holding `record` among other bytes."""
    path = tmp_path / "_C.so"
    path.write_bytes(b"\x7fELF" + b"\0" * 1000 + record + b"\0" * 1000)
    monkeypatch.setattr(_extension.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(origin=str(path)))
    return path


def test_build_record_is_read_from_the_file(tmp_path, monkeypatch):
    hexed = "0x" + "2.11.0+cu130".encode().hex()
    path = _fake_library(tmp_path, monkeypatch, f"KANGAROO_BUILD_INFO{{torch={hexed};cuda=0x31332e30;cxx11_abi=1}}".encode())
    assert _extension.read_build_info(str(path)) == {"torch": "2.11.0+cu130", "cuda": "13.0", "cxx11_abi": "1"}
    (tmp_path / "old.so").write_bytes(b"no record")
    assert _extension.read_build_info(str(tmp_path / "old.so")) == {}


def test_a_library_for_another_torch_is_refused_without_loading_it(tmp_path, monkeypatch):
    hexed = "0x" + "2.11.0+cu130".encode().hex()
    _fake_library(tmp_path, monkeypatch, f"KANGAROO_BUILD_INFO{{torch={hexed};cuda=0x31332e30;cxx11_abi=1}}".encode())

    def never(name):
        raise AssertionError("a library built for another torch must not be loaded")
    monkeypatch.setattr(_extension.importlib, "import_module", never)
    module, error, built, warn = _extension.load(RUNNING)
    assert module is None and warn and built["torch"] == "2.11.0+cu130"
    assert error == f"kangaroo_ext._C was built for torch 2.11.0+cu130 but torch 2.14.1+cu130 is running: {HINT}"


def test_an_undefined_symbol_gets_the_rebuild_hint(tmp_path, monkeypatch):
    _fake_library(tmp_path, monkeypatch, b"")   # an old build: no record

    def undefined(name):
        raise ImportError(f"{name}.so: undefined symbol: _ZN3c104cuda20CUDACachingAllocator9allocatorE")
    monkeypatch.setattr(_extension.importlib, "import_module", undefined)
    module, error, built, warn = _extension.load(RUNNING)
    assert module is None and warn
    assert error.startswith("kangaroo_ext._C does not match the running torch 2.14.1+cu130") and error.endswith(HINT)
    assert "undefined symbol" in error


def test_this_build_records_the_running_torch():
    if not _extension.loaded():
        pytest.skip(f"extension not built here: {_extension.LOAD_ERROR}")
    assert _extension.BUILD_INFO == _extension.running_torch()
    assert _extension._C.TORCH_VERSION == torch.__version__
    assert _extension._C.TORCH_CUDA_VERSION == (torch.version.cuda or "")


def test_another_running_torch_warns_once_and_info_says_why():
    """A fresh interpreter whose torch reports another version: one warning at import, no extension,
    the same line in LOAD_ERROR, in the CUDA backend's reasons and in `kangaroo info`."""
    if not _extension.BUILD_INFO.get("torch"):
        pytest.skip("needs a built extension that records its torch")
    script = textwrap.dedent("""
        import warnings
        import torch
        torch.__version__ = "9.99.0+cu999"  # a torch no extension was built for
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import kangaroo_ext
            from kangaroo_ext import _extension, info
        mine = [str(w.message) for w in caught if issubclass(w.category, _extension.ExtensionMismatchWarning)]
        assert len(mine) == 1, mine
        assert not _extension.loaded()
        assert mine[0] == _extension.LOAD_ERROR, (mine, _extension.LOAD_ERROR)
        info.print_info()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    line = f"kangaroo_ext._C was built for torch {torch.__version__} but torch 9.99.0+cu999 is running: {HINT}"
    assert line in run.stdout


@pytest.mark.parametrize("knob, getter, when_set, when_unset", [
    ("KANGAROO_DISABLE_PDL", "pdl_launches", False, True),                          # PDL is on unless disabled
    ("KANGAROO_BATCH_INVARIANT_ATTENTION", "batch_invariant_attention", True, True),  # on unless set to 0
    ("KANGAROO_TENSOR_CORE_GEMV", "tensor_core_gemv", True, True),                   # on unless set to 0
    ("KANGAROO_PERSISTENT_SPLIT_BARRIER", "persistent_split_barrier", True, False),  # off until set
    ("KANGAROO_PERSISTENT_L2_PREFETCH", "persistent_l2_prefetch", True, False),      # off until set
    ("KANGAROO_GEMV_DEEP_PREFETCH", "gemv_deep_prefetch", True, True),               # on unless set to 0
    ("KANGAROO_INTERLEAVED_KEY_SPLITS", "interleaved_key_splits", True, True),       # on unless set to 0
    ("KANGAROO_WARP_CHUNK_ATTENTION", "warp_chunk_attention", True, False),          # off until set
])
def test_launch_switches_reach_the_launchers(monkeypatch, knob, getter, when_set, when_unset):
    """The launchers' run-time switches are read by config.py and handed over at import (no kernel header
    reads the environment): set, unset and back."""
    from kangaroo_ext import _extension
    if not _extension.loaded():
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    read = getattr(_extension._C, getter)
    try:
        monkeypatch.setenv(knob, "1")
        _extension.apply_launch_settings()
        assert read() is when_set
        monkeypatch.setenv(knob, "0")
        _extension.apply_launch_settings()
        assert read() is (not when_set)
        monkeypatch.delenv(knob, raising=False)
        _extension.apply_launch_settings()
        assert read() is when_unset
    finally:
        monkeypatch.delenv(knob, raising=False)
        _extension.apply_launch_settings()


def test_launch_switches_are_restored_after_the_block():
    """_extension.launch_switches (the tests' and benchmarks' way to compare a switch's paths in one process)
    sets the named switches inside the block and puts back what they were after it, an exception included."""
    if not _extension.loaded():
        with _extension.launch_switches(persistent_l2_prefetch=True):   # a no-op without the extension
            pass
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    c = _extension._C
    before = (c.persistent_split_barrier(), c.persistent_l2_prefetch())
    with pytest.raises(RuntimeError, match="inside"):
        with _extension.launch_switches(persistent_split_barrier=not before[0], persistent_l2_prefetch=not before[1]):
            assert (c.persistent_split_barrier(), c.persistent_l2_prefetch()) == (not before[0], not before[1])
            raise RuntimeError("inside")
    assert (c.persistent_split_barrier(), c.persistent_l2_prefetch()) == before


@pytest.mark.parametrize("getter, value, refused", [
    ("persistent_max_blocks", 33, "blocks must be >= 0"),   # the persistent kernel's grid cap (0: all that fit)
    ("attention_max_tile_rows", 6, "rows must be >= 0"),    # attention's q-tile row cap (0: none)
])
def test_int_settings_are_restored_and_check_their_value(getter, value, refused):
    """The launchers' int settings (benchmarks' sweeps; 0 is the default) are read at each launch: set and
    restored like a switch, and a negative value is refused by name."""
    if not _extension.loaded():
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    read, write = getattr(_extension._C, getter), getattr(_extension._C, "set_" + getter)
    assert read() == 0
    with _extension.launch_switches(**{getter: value}):
        assert read() == value
    assert read() == 0
    with pytest.raises(ValueError, match=refused):
        write(-1)
    assert read() == 0


def test_attention_invariant_width_query_checks_its_arguments():
    """_C.attention_invariant_max_tokens (the copy rounds' width, engine/copy_rounds.py) names a bad argument
    before it asks any device; the Python wrapper answers None without an extension."""
    if not _extension.loaded():
        assert _extension.attention_invariant_max_tokens(3, 64, 2, 0) is None
        pytest.skip(f"no compiled extension: {_extension.LOAD_ERROR}")
    with pytest.raises(RuntimeError, match="group must be >= 1 and head_dim in 1..256, got group = 0"):
        _extension.attention_invariant_max_tokens(0, 64, 2, 0)
    with pytest.raises(RuntimeError, match="elem_size must be 2 or 4"):
        _extension.attention_invariant_max_tokens(3, 64, 3, 0)
    before = _extension._C.batch_invariant_attention()
    try:
        _extension._C.set_batch_invariant_attention(False)   # switched off: no call is invariant, no device asked
        assert _extension.attention_invariant_max_tokens(3, 64, 2, 0) == 0
    finally:
        _extension._C.set_batch_invariant_attention(before)
    assert _extension.attention_invariant_max_tokens(3, 64, 4, 0) == 0   # fp32: the default order
