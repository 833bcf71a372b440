"""The persistent draft kernel's price against the per-op draft graph (issue 21), on a GPU.

    python bench/persistent_draft_price.py --out bench/results/persistent_draft.json

For the default model's shape (SmolLM2-135M, the shipped adapter's layout: ℓ 2, an attention-only `kangaroo`
block, an 8k draft vocabulary) and Llama-3.2-1B's (a `decoder` block), random weights: the draft phase of 0
and γ drafts, the verify step and the plain step, with KANGAROO_PERSISTENT_DRAFT off, on, on with the
split barrier (KANGAROO_PERSISTENT_SPLIT_BARRIER) and on with the L2 prefetch of the next stage's weights
(KANGAROO_PERSISTENT_L2_PREFETCH), timed with CUDA events (medians after warm-up:
round_price.measure_round); the launches per draft phase; where the persistent phase's time goes (its own
barrier stamps: each stage kind's time and its barrier's); and, for each shape, whether one persistent draft
phase leaves bitwise the per-op phase's state (tokens, exit states, caches). Prices only: acceptance means
nothing with random weights.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_cases  # noqa: E402
import round_price  # noqa: E402
import shaped_models  # noqa: E402

SWITCH = "KANGAROO_PERSISTENT_DRAFT"
# The kernel's launch switches by path name (kangaroo_ext._extension.launch_switches' arguments).
KERNEL_MODES = {name: dict(persistent_split_barrier=split, persistent_l2_prefetch=prefetch,
                           persistent_max_blocks=0)
                for name, split, prefetch in (("whole", False, False), ("split", True, False),
                                              ("prefetch", False, True), ("split_prefetch", True, True))}
SHAPES = {"smollm2_135m": (shaped_models.SMOLLM2_135M, "kangaroo"), "llama_3_2_1b": (shaped_models.LLAMA_3_2_1B,
                                                                                     "decoder")}


@torch.inference_mode()  # the engine's buffers are inference tensors
def same_state(de, gamma: int) -> dict:
    """One draft phase per-op, then persistent, from the same saved state: which buffers differ."""
    e = de.engine
    names = ("tokens_in", "draft_tokens", "num_drafted", "active", "exit_states", "k_cache", "v_cache")
    de.restore()
    e.begin_round()
    for j in range(gamma + 1):
        if j and not bool(e.active[0]):
            break
        e.draft_step(j, gamma)
    want = {n: getattr(e, n).clone() for n in names}
    de.restore()
    e.begin_round()
    e.draft_phase_persistent(gamma, True)
    torch.cuda.synchronize()
    got = {n: getattr(e, n) for n in names}
    diff = [n for n in names if not torch.equal(got[n][:, :gamma + 1] if n == "exit_states" else got[n],
                                                want[n][:, :gamma + 1] if n == "exit_states" else want[n])]
    return {"bitwise_equal": not diff, "differ": diff, "drafted": int(want["num_drafted"][0])}


STAGES = ("start", "qkv", "attention", "merge", "o", "gate_up", "down", "head")  # persistent_draft.cuh: Stage


def stamped_times(launch, rows: int, repeats: int = 20, blocks: int = 0, device: str = "cuda") -> dict:
    """Where a persistent launch's time goes, from the kernel's own barrier stamps (global timer, ns):
    launch(stamps) runs it once from the same state. Per stage kind, the median over the launch's barriers
    and `repeats` runs of (a) the stage: from the first block leaving the previous barrier to the last
    block arriving at this one, (b) the barrier: from that last arrival to the last departure, and (c) its
    release: from that last arrival to the first departure (what the barrier itself costs, without the
    blocks that leave late). blocks: the stamps' width (default: 4 an SM, more than a launch has)."""
    blocks = blocks or 4 * torch.cuda.get_device_properties(0).multi_processor_count
    stage, barrier, release = {}, {}, {}
    for _ in range(repeats):
        stamps = torch.full((rows, blocks, 3), -1, dtype=torch.int64, device=device)
        launch(stamps)
        if device == "cuda":
            torch.cuda.synchronize()
        s = stamps.cpu()
        used = s[:, 0, 0] >= 0
        s = s[used][:, (s[used][0, :, 0] >= 0)]                    # barriers run x blocks that ran
        arrive, leave = s[:, :, 1].double(), s[:, :, 2].double()
        leave = torch.where(leave >= 0, leave, float("nan"))   # split barrier: blocks without a tile leave no stamp
        for k in range(1, s.shape[0]):
            kind = STAGES[int(s[k, 0, 0])]
            stage.setdefault(kind, []).append((arrive[k].max() - leave[k - 1].nan_to_num(float("inf")).min()).item()
                                              / 1e3)
            barrier.setdefault(kind, []).append((leave[k].nan_to_num(float("-inf")).max() - arrive[k].max()).item()
                                                / 1e3)
            release.setdefault(kind, []).append((leave[k].nan_to_num(float("inf")).min() - arrive[k].max()).item()
                                                / 1e3)
    med = lambda v: sorted(v)[len(v) // 2]
    return {kind: {"stage_us": med(stage[kind]), "barrier_us": med(barrier[kind]),
                   "release_us": med(release[kind]), "per_phase": len(stage[kind]) // repeats} for kind in stage}


@torch.inference_mode()
def stage_times(de, gamma: int, repeats: int = 20) -> dict:
    """stamped_times of one persistent draft phase of γ drafts."""
    e = de.engine
    rows = 1 + (gamma + 1) * (len(e.adapter_weights) + e.adapter.exit_layer) * 6 + gamma

    def launch(stamps):
        de.restore()
        e.begin_round()
        e.draft_phase_persistent(gamma, True, stamps=stamps)
    return stamped_times(launch, rows, repeats)


class PlainStepPrice:
    """A whole plain step in one launch (kangaroo_ext/engine/persistent_plain.py, issue 21's stretch item)
    against the per-op plain step's captured graph: bitwise check, price, stage stamps."""

    def __init__(self, de):
        from kangaroo_ext.engine.persistent_plain import PersistentPlainStep
        self.de, self.engine = de, de.engine
        self.step = PersistentPlainStep(de.engine)
        self.rows = 1 + de.engine.spec.num_layers * 6 + 2

    @torch.inference_mode()
    def check(self, plain_graph) -> dict:
        """The per-op plain step (its captured graph) and this launch from the same state: the same token
        and the same K/V everywhere? (The step's cache slot is poisoned first: a launch that writes nothing
        cannot pass on the per-op step's writes.)"""
        e = self.engine
        self.de.restore()
        plain_graph.replay()
        want = {"token": e.tokens_in[:, :1].clone(), "k_cache": e.k_cache.clone(), "v_cache": e.v_cache.clone()}
        self.de.restore()
        pos, n = int(e.cache_len[0]), e.spec.num_layers
        e.k_cache[:n, :, :, pos].fill_(1234.0)
        e.v_cache[:n, :, :, pos].fill_(1234.0)
        self.step.token.fill_(-1)
        self.step.launch()
        torch.cuda.synchronize()
        got = {"token": self.step.token, "k_cache": e.k_cache, "v_cache": e.v_cache}
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        return {"bitwise_equal": not diff, "differ": diff}

    @torch.inference_mode()
    def price(self, plain_graph) -> dict:
        import bench_timing
        graph = torch.cuda.CUDAGraph()
        self.de.restore()
        self.step.launch()                              # warm-up outside capture (the kernel's attributes)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            self.step.launch()
        out = {"check": self.check(plain_graph),
               "persistent_plain_step_us": bench_timing.us_each(graph.replay, setup=self.de.restore),
               "per_op_plain_step_us": bench_timing.us_each(plain_graph.replay, setup=self.de.restore)}
        out["ratio"] = out["persistent_plain_step_us"] / out["per_op_plain_step_us"]

        def stamped(stamps):
            self.de.restore()
            self.step.launch(stamps)
        out["stages"] = stamped_times(stamped, self.rows, repeats=10)
        return out


def grid_modes(grids) -> dict:
    """The whole-barrier mode on grids of at most each of `grids` blocks ("whole_<n>_blocks"): how a stage's
    and a barrier's time scale with the grid."""
    return {f"whole_{n}_blocks": dict(KERNEL_MODES["whole"], persistent_max_blocks=n) for n in grids}


def plain_step_paths(de, modes=KERNEL_MODES) -> dict:
    """PlainStepPrice's check and price in each of `modes` (launch_switches' settings by name); the switches
    as they were after."""
    import kangaroo_ext as kx
    plain, _ = de.engine.graphs_for(1, False, device_exit=False)   # captured by round_price.measure_round
    out = {}
    for name, mode in modes.items():
        try:
            with kx._extension.launch_switches(**mode):
                out[name] = PlainStepPrice(de).price(plain.plain)
        except Exception as err:  # keep the other numbers
            out[name] = {"error": f"{type(err).__name__}: {err}"}
    return out


def show(shape_name: str, key: str, value) -> None:
    """Each result as soon as it is measured (a run stopped at its time limit keeps what it printed)."""
    print(f"[{shape_name}] {key}: {json.dumps(value, default=str)[:1500]}", flush=True)


def measure(shape_name: str, prompt_tokens: int = 160, new_tokens: int = 64, exit_layer: int = 2,
            draft_vocab: int = 8192, per_op_only: bool = False, plain_step: bool = True, grids=(),
            modes=tuple(KERNEL_MODES)) -> dict:
    """The round's prices per-op and on the persistent draft paths of `modes` (KERNEL_MODES names), the
    persistent plain step in those modes (and on the `grids` caps), the checks and the stage stamps."""
    shape, arch = SHAPES[shape_name]
    model = shaped_models.random_llama(shape, "cuda", bench_cases.DTYPE)
    adapter = shaped_models.random_adapter(model, exit_layer, draft_vocab, architecture=arch)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, shape["vocab_size"], (1, prompt_tokens), generator=g).cuda()
    out = {"shape": shape_name, "adapter": arch, "exit_layer": exit_layer, "draft_vocab": draft_vocab}
    import kangaroo_ext as kx
    paths = (("per_op", False, "whole"), ("persistent", True, "whole"), ("persistent_split", True, "split"),
             ("persistent_prefetch", True, "prefetch"), ("persistent_split_prefetch", True, "split_prefetch"))
    paths = [path for path in paths if not path[1] or path[2] in modes]
    for key, on, mode in paths[:1] if per_op_only else paths:
        os.environ[SWITCH] = "1" if on else "0"
        with kx._extension.launch_switches(**KERNEL_MODES[mode]):
            de = bench_cases.DefaultEngine(new_tokens=new_tokens, model=model, adapter=adapter, prompt=prompt)
            why = de.engine.persistent_draft_off(de.graphs.gamma)
            if on and why:
                out[key] = {"error": why}
                continue
            out[key] = round_price.measure_round(de)
            show(shape_name, key, out[key])
            if key == "per_op" and plain_step:
                out["persistent_plain_step"] = plain_step_paths(de, {m: KERNEL_MODES[m] for m in modes})
                show(shape_name, "persistent_plain_step", out["persistent_plain_step"])
                per_op_engine = de   # kept for the grid sweep, last: the draft paths' prices come first
            if on:
                out["check" + key[10:]] = same_state(de, de.graphs.gamma)
                out["stages" + key[10:]] = stage_times(de, de.graphs.gamma)
                show(shape_name, "check" + key[10:], out["check" + key[10:]])
            del de
    os.environ.pop(SWITCH, None)
    if grids and plain_step:
        sweep = plain_step_paths(per_op_engine, grid_modes(grids))
        out["persistent_plain_step"].update(sweep)
        show(shape_name, "persistent_plain_step grids", sweep)
        del per_op_engine
    del model, adapter
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "persistent_draft.json"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--per-op-only", action="store_true",
                    help="the per-op draft path's round alone (e.g. to price KANGAROO_FUSED_VERIFY_TAIL on and off)")
    ap.add_argument("--grids", default="",
                    help="comma-separated grid caps (blocks) at which to price the persistent plain step again, "
                         "e.g. 66,33,16")
    ap.add_argument("--modes", default=",".join(KERNEL_MODES),
                    help="the persistent kernel's launch modes to price, comma-separated (of "
                         f"{', '.join(KERNEL_MODES)})")
    ap.add_argument("--attention-max-tile-rows", type=int, default=0,
                    help="price everything with attention's verify tiles cut into q-tiles of at most this many rows "
                         "(_C.set_attention_max_tile_rows; 0: no cap)")
    args = ap.parse_args()
    if args.attention_max_tile_rows < 0:
        ap.error(f"--attention-max-tile-rows must be >= 0, got {args.attention_max_tile_rows}")
    grids = [int(n) for n in args.grids.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in KERNEL_MODES]
    if unknown:
        ap.error(f"--modes: unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(KERNEL_MODES)}")
    from kangaroo_ext import _extension, config
    from kangaroo_ext.io import git_commit
    result = {"device": torch.cuda.get_device_name(), "commit": git_commit()[0],
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_flags": config.run_flags(),
              "attention_max_tile_rows": args.attention_max_tile_rows, "shapes": {}}
    for name in args.shapes.split(","):
        try:
            with _extension.launch_switches(attention_max_tile_rows=args.attention_max_tile_rows):
                r = measure(name, per_op_only=args.per_op_only, plain_step=not args.per_op_only, grids=grids,
                            modes=modes)
        except Exception as e:  # keep the other shape's numbers
            r = {"error": f"{type(e).__name__}: {e}"}
        result["shapes"][name] = r
        for key in ("per_op", "persistent", "persistent_split", "persistent_prefetch", "persistent_split_prefetch"):
            m = r.get(key, {})
            if "draft_round_us" in m:
                d = {int(k): v for k, v in m["draft_round_us"].items()}
                print(f"{name} {key}: draft round 0 / {m['gamma']} drafts {d[0]:.1f} / {d[int(m['gamma'])]:.1f} us, "
                      f"step {m.get('draft_step_us', float('nan')):.1f} us, plain {m['plain_step_us']:.1f} us, "
                      f"launches {m.get('launches_per_phase', {})}", flush=True)
            elif m:
                print(f"{name} {key}: {m}", flush=True)
        for path, m in r.get("persistent_plain_step", {}).items():
            if "error" in m:
                print(f"{name} persistent plain step ({path} barrier): {m['error']}", flush=True)
                continue
            print(f"{name} persistent plain step ({path} barrier): {m['persistent_plain_step_us']:.1f} us against "
                  f"{m['per_op_plain_step_us']:.1f} us per-op ({m['ratio']:.2f}x), check {m['check']}", flush=True)
            for kind, t in m["stages"].items():
                print(f"  {kind:10s} x{t['per_phase']:3d}: stage {t['stage_us']:.2f} us, "
                      f"barrier {t['barrier_us']:.2f} us (release {t.get('release_us', float('nan')):.2f})")
        for suffix in ("", "_split", "_prefetch", "_split_prefetch"):
            if "check" + suffix not in r:   # a mode not priced (--modes, --per-op-only)
                continue
            print(f"{name} check{suffix}: {r['check' + suffix]}", flush=True)
            for kind, t in r.get("stages" + suffix, {}).items():
                print(f"  {kind:10s} x{t['per_phase']:3d}: stage {t['stage_us']:.2f} us, "
                      f"barrier {t['barrier_us']:.2f} us (release {t.get('release_us', float('nan')):.2f})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
