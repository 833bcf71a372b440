"""scripts/gpu_check.sh's pieces that need no GPU: attributing compute-sanitizer reports to kernels (ours
apart), the gate over a log, and `--stale`."""
import importlib.util
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("sanitizer_report", os.path.join(ROOT, "scripts", "sanitizer_report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

# The shapes of compute-sanitizer's reports (memcheck, racecheck, synccheck, initcheck, an API error).
SAMPLE = """\
========= COMPUTE-SANITIZER
........                                                                 [100%]
========= Invalid __global__ read of size 2 bytes
=========     at void kangaroo::kernels::rms_norm_kernel<__nv_bfloat16, 8>(const T1 *, int)+0x2f0 in /w/csrc/kernels/rms_norm.cuh:57
=========     by thread (31,0,0) in block (0,0,0)
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: [0x2f1f3] in libcuda.so.1
=========
========= Error: Race reported between Write access at void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>(Params)+0x1a0 in gemm.h:10
=========     and Read access at void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>(Params)+0x1b0 in gemm.h:12 [4 hazards]
========= Warning: Race reported between Write access at _attn_split_kernel+0x3c0 in attention.py:200
=========     and Read access at _attn_split_kernel+0x3d0 in attention.py:201 [8 hazards]
========= Barrier error detected. Divergent thread(s) in warp
=========     at kangaroo::kernels::lm_head_kernel(int)+0x90 in /w/csrc/kernels/lm_head.cuh:80
========= Uninitialized __global__ memory read of size 4 bytes
=========     at void at::native::reduce_kernel<512, 1>(R)+0x10 in Reduce.cuh:9
========= Program hit cudaErrorNotReady (error 600) due to "device not ready" on CUDA API call to cudaEventQuery.
=========     Saved host backtrace up to driver entry point at error
========= ERROR SUMMARY: 6 errors
"""


def test_reports_are_attributed_to_kernels_ours_apart(tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text(SAMPLE)
    report.summarise("memcheck", str(raw))
    out = capsys.readouterr().out
    assert "GATE tool=memcheck ours=3 others=2 api_errors=1 unprinted=0 incomplete=0" in out
    assert "kangaroo::kernels::rms_norm_kernel" in out and "_attn_split_kernel" in out
    assert "OURS memcheck" in out and "kangaroo::kernels::lm_head_kernel" in out


def test_triton_kernel_names_come_from_the_sources():
    names = report.our_triton_kernels()
    assert {"_attn_split_kernel", "_partial_kernel", "_fused_add_rms_norm_kernel"} <= names


def test_unprinted_reports_cannot_be_attributed(tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 4 bytes\n"
                   "=========     at other_kernel()+0x1 in a.cu:1\n========= ERROR SUMMARY: 500 errors\n")
    report.summarise("initcheck", str(raw))
    assert "GATE tool=initcheck ours=0 others=1 api_errors=0 unprinted=499 incomplete=0" in capsys.readouterr().out


def test_a_run_that_died_or_never_started_fails(tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_text("bash: compute-sanitizer: command not found\n")
    report.summarise("synccheck", str(raw))
    assert "incomplete=1" in capsys.readouterr().out
    log = tmp_path / "gpu_check.log"
    log.write_text("TESTS suite=gpu rc=0\n" + "".join(
        f"GATE tool={t} ours=0 others=0 api_errors=0 unprinted=0 incomplete={int(t == 'synccheck')}\n"
        for t in ("memcheck", "racecheck", "synccheck", "initcheck")))
    assert report.gate(str(log)) == 1
    assert "synccheck: a sanitizer run did not finish" in capsys.readouterr().out


def _log(tmp_path, ours=0, tests_rc=0, tools=("memcheck", "racecheck", "synccheck", "initcheck")):
    lines = ["commit: 0123456789abcdef0123456789abcdef01234567", f"TESTS suite=gpu rc={tests_rc}", "TESTS suite=files rc=0"]
    lines += [f"GATE tool={t} ours={ours if t == 'racecheck' else 0} others=7 api_errors=1 unprinted=0" for t in tools]
    path = tmp_path / "gpu_check.log"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_gate_passes_only_with_passing_tests_and_no_reports_in_our_kernels(tmp_path, capsys):
    assert report.gate(_log(tmp_path)) == 0
    assert report.gate(_log(tmp_path, ours=2)) == 1
    assert "racecheck: 2 reports in kangaroo kernels" in capsys.readouterr().out
    assert report.gate(_log(tmp_path, tests_rc=1)) == 1
    assert report.gate(_log(tmp_path, tools=("memcheck",))) == 1
    assert "no result for racecheck, synccheck, initcheck" in capsys.readouterr().out


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _stale(log):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--stale", "--log", log],
                          cwd=ROOT, capture_output=True, text=True)


def test_stale_compares_the_log_with_the_last_kernel_change(tmp_path):
    touched = _git("log", "-1", "--format=%H", "--", "csrc", "triton_kernels").stdout.strip()
    before = _git("rev-parse", "--verify", "-q", touched + "~1").stdout.strip() if touched else ""
    if not before:
        pytest.skip("needs the git history of csrc/ (a full clone)")
    log = tmp_path / "gpu_check.log"
    assert "no gate log" in _stale(str(log)).stdout and _stale(str(log)).returncode == 1
    log.write_text(f"commit: {touched}\nGATE PASS: ...\n")
    run = _stale(str(log))
    assert run.returncode == 0 and run.stdout.startswith("fresh:") and "GATE PASS" in run.stdout
    log.write_text(f"commit: {before}\n")
    run = _stale(str(log))
    assert run.returncode == 1 and run.stdout.startswith("stale:") and touched[:12] in run.stdout
