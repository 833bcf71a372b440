"""The benchmark's PNG plots: speedup by category, accepted drafts per round, acceptance by position.
matplotlib's object API on the Agg canvas: no display, no global backend switch; without matplotlib the
plots are skipped with a printed note."""
import os
from typing import List

from ..io import atomic_write

PLOT_FILES = ("speedup_by_category.png", "accepted_per_round.png", "acceptance_by_position.png")


def _figure(width=7.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str):
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def write_plots(summary: dict, out_dir: str) -> List[str]:
    """Speedup vs plain by category, accepted drafts per round, acceptance by position. Returns paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("kangaroo bench: matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    written = []
    others = [m for m in summary if m != "plain"]
    if "plain" in summary and others:
        cats = list(summary[others[0]]["per_category"]) + ["overall"]
        fig = _figure(max(7.0, 0.9 * len(cats) + 2))
        ax = fig.add_subplot()
        width = 0.8 / len(others)
        for i, m in enumerate(others):
            vals = [(summary[m]["overall"] if c == "overall" else summary[m]["per_category"].get(c, {}))
                    .get("speedup_vs_plain") or 0.0 for c in cats]
            ax.bar([x + (i - (len(others) - 1) / 2) * width for x in range(len(cats))], vals, width, label=m)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.set_ylabel("speedup vs plain (mean tok/s ratio)")
        ax.set_title("Speedup over plain decoding, by category")
        ax.legend()
        written.append(os.path.join(out_dir, PLOT_FILES[0]))
        _save(fig, written[-1])
    o = summary.get("kangaroo", {}).get("overall", {})
    hist = o.get("accepted_histogram")
    if hist and sum(hist):
        fig = _figure()
        ax = fig.add_subplot()
        ax.bar(range(len(hist)), [n / sum(hist) for n in hist])
        ax.set_xticks(range(len(hist)))
        ax.set_xlabel("drafts accepted in the round (tokens committed = accepted + 1)")
        ax.set_ylabel("share of rounds")
        ax.set_title(f"Kangaroo: accepted drafts per round (τ = {o.get('mean_accepted', 0):.2f})")
        written.append(os.path.join(out_dir, PLOT_FILES[1]))
        _save(fig, written[-1])
    by_pos = o.get("acceptance_by_position")
    if by_pos and any(p is not None for p in by_pos):  # None: no draft ever reached that position
        fig = _figure()
        ax = fig.add_subplot()
        xs = list(range(1, len(by_pos) + 1))
        ax.bar(xs, [0.0 if p is None else p for p in by_pos])
        ax.set_ylim(0, 1)
        ax.set_xticks(xs)
        ax.set_xlabel("draft position i")
        ax.set_ylabel("P(draft i accepted | proposed)")
        ax.set_title("Kangaroo: acceptance by draft position")
        written.append(os.path.join(out_dir, PLOT_FILES[2]))
        _save(fig, written[-1])
    return written
