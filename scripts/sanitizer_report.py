"""Summarises compute-sanitizer output for scripts/gpu_check.sh: reports per kernel, ours apart.

    python scripts/sanitizer_report.py TOOL RAW.txt     lines for the log: every report's kernel, counts
                                                        per kernel, and one `GATE tool=...` line
    python scripts/sanitizer_report.py --gate LOG       exit 1 unless the log's TESTS lines passed and every
                                                        tool's GATE line shows zero reports in kangaroo
                                                        kernels (and nothing unprinted)

A report is a line `========= <what>` (one space: the sanitizer's report header, as opposed to its
indented detail lines); its kernel is the first `at <function>` in the header or its detail lines.
"Ours": a name containing `kangaroo` (csrc/, namespace kangaroo) or one of the @triton.jit functions of
triton_kernels/ (Triton names a kernel after its Python function). API errors (`Program hit cudaError...`)
are listed but are not kernel reports. The sanitizer prints at most --print-limit reports; when its
summary counts more than were printed, the unprinted ones cannot be attributed and fail the gate.
"""
import collections
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "========= "
NOT_REPORTS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application",
               "Saved host backtrace", "Host Frame", "Device Frame", "No ", "This ")
AT = re.compile(r"\s*at (?:0x[0-9a-f]+ in )?(?P<name>.+?)(?:\+0x[0-9a-f]+)?(?: in \S+:\d+)?\s*$")
AT_INLINE = re.compile(r"\baccess at (?:0x[0-9a-f]+ in )?(?P<name>.+?)(?:\+0x[0-9a-f]+)?(?: in \S+:\d+)?"
                       r"(?: and |\s*$)")
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazard")


def our_triton_kernels():
    """Names of the @triton.jit functions in triton_kernels/*.py."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "triton_kernels", "*.py")):
        with open(path) as f:
            text = f.read()
        names.update(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)\(", text))
    return names


def is_ours(kernel: str, triton_names) -> bool:
    return "kangaroo" in kernel or any(re.search(rf"\b{re.escape(n)}\b", kernel) for n in triton_names)


def short(name: str, width: int = 110) -> str:
    name = re.sub(r"\s+", " ", name.strip())
    return name if len(name) <= width else name[:width - 3] + "..."


def parse(lines):
    """([(header, kernel or None)] kernel reports, [API error headers], count the sanitizer summaries claim,
    whether some run has no summary: it died, or the sanitizer never started)."""
    reports, api_errors = [], []
    errors = hazards = 0   # what the summaries of every run in the file claim (racecheck may print both)
    started = error_summaries = hazard_summaries = 0
    current = None
    for raw in lines:
        line = raw.rstrip("\n")
        started += line.startswith(PREFIX + "COMPUTE-SANITIZER")
        m = ERROR_SUMMARY.search(line)
        errors += int(m.group(1)) if m else 0
        error_summaries += bool(m)
        m = RACECHECK_SUMMARY.search(line)
        hazards += int(m.group(1)) if m else 0
        hazard_summaries += bool(m)
        if not line.startswith(PREFIX):
            continue
        body = line[len(PREFIX):]
        if body.startswith(" "):                       # a detail line of the current report
            if current is not None and current[1] is None:
                at = AT.match(body)
                if at:
                    current[1] = at.group("name")
            continue
        current = None
        if body.startswith(NOT_REPORTS) or not body.strip():
            continue
        if body.startswith("Program hit"):
            api_errors.append(body)
            continue
        inline = AT_INLINE.search(body)
        current = [body, inline.group("name") if inline else None]
        reports.append(current)
    incomplete = started == 0 or max(error_summaries, hazard_summaries) < started   # a run died or never ran
    return [tuple(r) for r in reports], api_errors, max(errors, hazards), incomplete


def summarise(tool: str, path: str) -> int:
    with open(path, errors="replace") as f:
        reports, api_errors, claimed, incomplete = parse(f)
    triton_names = our_triton_kernels()
    per_kernel = collections.Counter()
    ours = others = 0
    for header, kernel in reports:
        kernel = kernel or "?"
        per_kernel[(is_ours(kernel, triton_names), kernel)] += 1
        if is_ours(kernel, triton_names):
            ours += 1
            print(f"  OURS {tool}: {short(header, 80)} in {short(kernel)}")
        else:
            others += 1
    for (mine, kernel), count in sorted(per_kernel.items(), key=lambda kv: (-kv[0][0], -kv[1])):
        print(f"  {tool} {'kangaroo' if mine else 'other   '} {count:6d}  {short(kernel)}")
    for header in collections.Counter(api_errors):
        print(f"  {tool} api error: {short(header)}")
    unprinted = max(0, claimed - len(reports) - len(api_errors))
    if incomplete:
        print(f"  {tool}: a sanitizer run has no summary (it died, or compute-sanitizer did not start)")
    print(f"GATE tool={tool} ours={ours} others={others} api_errors={len(api_errors)} unprinted={unprinted} "
          f"incomplete={int(incomplete)}")
    return 0


def _fields(line: str) -> dict:
    return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)


def gate(log: str) -> int:
    """0 if the log holds a passing test run and, for every tool, zero reports in kangaroo kernels."""
    with open(log, errors="replace") as f:
        lines = f.readlines()
    tools = {g["tool"]: g for g in map(_fields, (l for l in lines if l.startswith("GATE tool=")))}  # last run counts
    tests = {t["suite"]: t for t in map(_fields, (l for l in lines if l.startswith("TESTS suite=")))}
    problems = []
    for suite, t in sorted(tests.items()):
        print(f"  tests {suite:<6} pytest exit status {t['rc']}")
        if t["rc"] != "0":
            problems.append(f"the {suite} tests failed (pytest exit status {t['rc']})")
    if not tests:
        problems.append("no GPU test run")
    for tool, g in sorted(tools.items()):
        print(f"  {tool:<10} kangaroo kernels: {g['ours']}, other kernels: {g['others']}, "
              f"API errors: {g['api_errors']}, unprinted: {g['unprinted']}")
        if int(g["ours"]) or int(g["unprinted"]):
            problems.append(f"{tool}: {g['ours']} reports in kangaroo kernels, {g['unprinted']} unattributed")
        if g.get("incomplete", "0") != "0":
            problems.append(f"{tool}: a sanitizer run did not finish")
    missing = [t for t in ("memcheck", "racecheck", "synccheck", "initcheck") if t not in tools]
    if missing:
        problems.append(f"no result for {', '.join(missing)}")
    if problems:
        print("GATE FAIL: " + "; ".join(problems))
        return 1
    print("GATE PASS: GPU tests pass and no sanitizer report is in a kangaroo kernel")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--gate":
        sys.exit(gate(sys.argv[2]))
    if len(sys.argv) == 3:
        sys.exit(summarise(sys.argv[1], sys.argv[2]))
    sys.exit(__doc__)
