"""CPU threads under load (issue 23): plain decoding and Kangaroo, fp32 on the CPU, at 1, 2, ... torch
threads, on an idle machine and with other cores kept busy by busy-loop processes.

    OMP_NUM_THREADS=1 python bench/threads.py --threads 1,2 --busy 0,1 --new 64 --out bench/results/threads_cpu.json

Each (threads, busy) case runs in a fresh process (a fresh torch thread pool): it loads the default model,
runs one short untimed pass of each method, then times plain decoding and Kangaroo (the shipped adapter,
its CPU recommendation) on the demo prompt, greedy, --new tokens, as `kangaroo generate --compare` does.
The busy processes (`python -c 'while True: pass'`) start before the case's process and are killed after
it. The table printed at the end gives each case's median over the passes (and their range); BENCHMARKS.md's
"CPU threads" table lists the passes of bench/results/threads_cpu.json one by one, since the machine's other
load differed between them.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUSY_LOOP = "while True: pass"


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def measure(threads: int, new_tokens: int, warmup_tokens: int) -> dict:
    """One case, in this process: tok/s of plain decoding and of Kangaroo on the demo prompt."""
    import torch

    import kangaroo_ext as kx
    from kangaroo_ext import config, io
    from kangaroo_ext.cli import DEMO_PROMPT
    config.apply_cpu_threads(threads)
    model, tokenizer = kx.load_default_model(device="cpu", dtype=torch.float32)
    adapter = kx.load_default_adapter(model)
    ids = torch.tensor([io.chat_ids(tokenizer, DEMO_PROMPT)])
    eos = tokenizer.eos_token_id
    kx.generate(model, ids, max_new_tokens=warmup_tokens, eos_token_id=eos)
    kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=warmup_tokens, eos_token_id=eos)
    plain = kx.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=eos).stats
    spec = kx.speculative_generate(model, ids, adapter=adapter, max_new_tokens=new_tokens, eos_token_id=eos).stats
    return {"threads": torch.get_num_threads(), "plain_tok_s": round(plain.tokens_per_second, 2),
            "kangaroo_tok_s": round(spec.tokens_per_second, 2), "new_tokens": spec.new_tokens,
            "tau": round(spec.mean_accepted, 3)}


def run_case(threads: int, busy: int, new_tokens: int, warmup_tokens: int, timeout_s: float) -> dict:
    """A case in a child process, with `busy` busy-loop processes alive around it."""
    # What else ran: on a shared machine other programs load the cores too; the 1-minute load average
    # before the case (busy loops not yet started) says how much.
    load_before = round(os.getloadavg()[0], 2)
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)  # let the loops reach the scheduler before timing starts
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--case", str(threads), "--new", str(new_tokens),
                               "--warmup-tokens", str(warmup_tokens)],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"case threads={threads} busy={busy} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    result.update(busy=busy, wall_s=round(time.perf_counter() - t0, 1), load_before=load_before)
    return result


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def table(cases) -> str:
    """Median over the repeats of each (threads, busy) case, with the range where there are several;
    shares are of the best idle median (what the machine gives when nothing else runs)."""
    keys = sorted({(c["threads"], c["busy"]) for c in cases}, key=lambda k: (k[1], k[0]))
    runs = {k: [c for c in cases if (c["threads"], c["busy"]) == k] for k in keys}
    median = {k: {m: _median([c[m] for c in runs[k]]) for m in ("plain_tok_s", "kangaroo_tok_s")} for k in keys}
    best_idle = {m: max([median[k][m] for k in keys if k[1] == 0] or [float("nan")])
                 for m in ("plain_tok_s", "kangaroo_tok_s")}

    def cell(k, m):
        values = [c[m] for c in runs[k]]
        spread = f" ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 else ""
        return f"{median[k][m]:.1f}{spread}"
    rows = ["| threads | busy-loop processes | runs | plain tok/s | Kangaroo tok/s | Kangaroo ÷ plain | "
            "plain, share of best idle | Kangaroo, share of best idle |", "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        m = median[k]
        rows.append(f"| {k[0]} | {k[1]} | {len(runs[k])} | {cell(k, 'plain_tok_s')} | {cell(k, 'kangaroo_tok_s')} | "
                    f"{m['kangaroo_tok_s'] / m['plain_tok_s']:.2f}× | "
                    f"{100 * m['plain_tok_s'] / best_idle['plain_tok_s']:.0f}% | "
                    f"{100 * m['kangaroo_tok_s'] / best_idle['kangaroo_tok_s']:.0f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=_ints, default=[1, 2], help="comma list of torch thread counts")
    p.add_argument("--busy", type=_ints, default=[0, 1], help="comma list of busy-loop process counts")
    p.add_argument("--new", type=int, default=64, help="new tokens per timed run")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed pass per method")
    p.add_argument("--repeat", type=int, default=1, help="passes over the whole grid (the table gives medians)")
    p.add_argument("--append", action="store_true", help="add to the cases already in --out")
    p.add_argument("--timeout", type=float, default=900, help="seconds per case before it is abandoned")
    p.add_argument("--out", default=os.path.join(HERE, "results", "threads_cpu.json"))
    p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # the child process: one case
    args = p.parse_args(argv)
    if args.case is not None:
        print(json.dumps(measure(args.case, args.new, args.warmup_tokens)))
        return 0

    from kangaroo_ext import io
    commit, dirty = io.git_commit()
    cases = []
    if args.append:
        with open(args.out, encoding="utf-8") as f:
            cases = json.load(f)["cases"]
    for _ in range(args.repeat):
        for busy in args.busy:
            for threads in args.threads:
                case = run_case(threads, busy, args.new, args.warmup_tokens, args.timeout)
                case.update(commit=commit, dirty=dirty, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                print(json.dumps(case), flush=True)
                cases.append(case)
    io.write_json(args.out, {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                             "new_tokens": args.new, "prompt": "the demo prompt (kangaroo generate)",
                             "cases": cases})
    print(table(cases))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
