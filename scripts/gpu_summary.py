"""The table a GPU validation run ends with (issue 24): pass / fail / skip counts per test file from the
suite's JUnit XML, the sanitizer gate's verdict, the soak's numbers, the fp32 checks and the MT-bench tok/s.
Each part says 'not run' where its input is missing, so a run stopped at its time limit still summarises
what finished.

    python scripts/gpu_summary.py --junit OUT/gpu_suite.xml --gate bench/results/gpu_check.log \
        --soak bench/results/soak.json --fp32 bench/results/fp32_arbiter_long.json \
        --mtbench bench/results/mt_bench_h200_abc1234/summary.json [--sampled DIR/summary.json]
"""
import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def suite_counts(path: str) -> dict:
    """{test file: {passed, failed, skipped}} from pytest's --junitxml output."""
    counts = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(path).getroot().iter("testcase"):
        name = (case.get("classname") or "?").split(".")
        where = "/".join(name[:-1] if len(name) > 1 and name[-1][:1].isupper() else name) + ".py"
        if case.find("failure") is not None or case.find("error") is not None:
            counts[where]["failed"] += 1
        elif case.find("skipped") is not None:
            counts[where]["skipped"] += 1
        else:
            counts[where]["passed"] += 1
    return dict(counts)


def _load(path):
    if path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("junit", "gate", "soak", "fp32", "mtbench", "sampled"):
        p.add_argument(f"--{name}")
    args = p.parse_args(argv)
    lines = ["| part | result |", "|---|---|"]
    if args.junit and os.path.isfile(args.junit):
        counts = suite_counts(args.junit)
        total = {k: sum(c[k] for c in counts.values()) for k in ("passed", "failed", "skipped")}
        lines.append(f"| pytest -m gpu | {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped |")
        for where, c in sorted(counts.items()):
            lines.append(f"| &nbsp; {where} | {c['passed']} / {c['failed']} / {c['skipped']} |")
    else:
        lines.append("| pytest -m gpu | not run |")
    verdict = "not run"
    if args.gate and os.path.isfile(args.gate):
        found = [ln.strip() for ln in open(args.gate) if ln.startswith("GATE")]
        verdict = found[-1] if found else "no gate verdict in the log"
    lines.append(f"| sanitizer gate | {verdict} |")
    soak = _load(args.soak)
    lines.append("| soak | " + (f"{soak['calls']} calls, {soak['calls_per_s']} calls/s, peak {soak['peak_device_mb']} MB, "
                                 f"checks {'all pass' if all(soak['checks'].values()) else soak['checks']} |"
                                 if soak else "not run |"))
    fp32 = _load(args.fp32)
    lines.append("| fp32 long prompts | " + (f"{fp32['verdicts']}; transformers changed by the engine on "
                                              f"{fp32.get('transformers_changed_by_the_engine')} |" if fp32 else "not run |"))
    for label, path in (("MT-bench greedy", args.mtbench), ("MT-bench sampled (T=1)", args.sampled)):
        s = _load(path)
        if s:
            m = s["methods"]
            lines.append(f"| {label} | kangaroo {m['kangaroo']['tok_per_s']:.0f} tok/s, plain {m['plain']['tok_per_s']:.0f} "
                         f"tok/s, ratio {s['speedup_vs_plain']:.3f}, τ {m['kangaroo'].get('mean_accepted', 0):.2f} |")
        else:
            lines.append(f"| {label} | not run |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
