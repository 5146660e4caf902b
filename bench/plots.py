"""PNG plots from benchmark JSONs (matplotlib, Agg backend: no display needed). Plots are drawn, not
committed: by a benchmark command's ``--plots DIR`` and by ``hedgerow bench report``.

offline: speedup by contender, acceptance-length histogram; serve: latency CDFs;
sweep: measured and ideal speedup against alpha.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hedgerow.bench.common import speculative_histograms


def _plt():
    try:
        import matplotlib
    except ImportError:
        from hedgerow.server.errors import HedgerowError

        raise HedgerowError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.bbox": "tight", "axes.grid": True, "grid.alpha": 0.3,
                         "svg.hashsalt": "hedgerow"})
    return plt


def _save(fig, folder: str | Path, name: str) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    fig.clf()
    return path


def _title(config: dict) -> str:
    sampling = "greedy" if config.get("greedy", True) else f"T={config['sampling']['temperature']:g}"
    return (f"{config.get('prompts')}, {config.get('num_prompts')} prompts, {config.get('max_new_tokens')} tokens, "
            f"{sampling}, {config.get('target_device', 'cpu')}")


def _speedup(plt, data: dict):
    cfg, results = data["config"], data["results"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = [r["name"] for r in results]
    speed = [r["speedup_vs_plain"] or 0.0 for r in results]
    colors = ["#2b6a4d" if r["kind"] == "engine" else "#999999" for r in results]
    bars = ax.bar(names, speed, color=colors)
    ax.bar_label(bars, labels=[f"{s:.2f}×" for s in speed], padding=2, fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("tokens/s relative to plain decoding")
    ax.set_title(f"Speedup over plain decoding\n{_title(cfg)}", fontsize=9)
    return fig


def _acceptance(plt, data: dict):
    spec = speculative_histograms(data["results"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    longest = max(int(k) for r in spec for k in r["acceptance_length_histogram"])
    xs = list(range(1, longest + 1))
    width = 0.8 / len(spec)
    for i, r in enumerate(spec):
        hist = r["acceptance_length_histogram"]
        total = sum(hist.values())
        ax.bar([x + (i - (len(spec) - 1) / 2) * width for x in xs],
               [hist.get(str(x), 0) / total for x in xs], width,
               label=f"{r['name']} (mean {r['mean_accepted_length']:.2f})")
    ax.set_xticks(xs)
    ax.set_xlabel("emitted tokens per verify step (the target's own token included)")
    ax.set_ylabel("share of steps")
    ax.set_title(f"Acceptance length\n{_title(data['config'])}", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _cdf(metric: str, label: str):
    def draw(plt, data: dict):
        results = data["results"]
        levels = sorted({r["concurrency"] for r in results})
        several = len({r.get("target") for r in results}) > 1  # a run of several servers: name each
        fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.2), squeeze=False)
        for ax, c in zip(axes[0], levels):
            for r in (r for r in results if r["concurrency"] == c):
                values = sorted(r["samples"][metric])
                if values:
                    ax.step([values[0]] + values, [0.0] + [(i + 1) / len(values) for i in range(len(values))],
                            where="post",
                            label=f"{r['target']} {r['speculation']}" if several else r["speculation"])
            ax.set_title(f"concurrency {c}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("fraction of requests")
        return fig

    return draw


def _speedup_vs_alpha(plt, data: dict):
    rows = [r for r in data["results"] if r.get("alpha") is not None]
    cfg = data["config"]
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    xs = [r["alpha_realised"] for r in rows]
    ax.plot(xs, [r["speedup_vs_plain"] for r in rows], "o-", label="measured", color="#2b6a4d")
    ax.plot(xs, [r["ideal_speedup"] for r in rows], "s--", label="ideal (verify = 1 target step)", color="#999999")
    ax.plot(xs, [r["ideal_speedup_verify_cost"] for r in rows], "^:", label="ideal, measured verify cost",
            color="#c07a2b")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("per-token acceptance α (realised)")
    ax.set_ylabel("speedup over plain decoding")
    t, d = cfg["target_shape"], cfg["draft_shape"]
    ax.set_title(f"Systems benchmark: oracle drafter, {cfg['draft_tokens']} draft tokens, "
                 f"{cfg['device']} {cfg['dtype']}\n"
                 f"target {t['name']} ({t['params'] / 1e6:.3g}M), draft {d['name']} ({d['params'] / 1e6:.3g}M), "
                 f"random weights", fontsize=9)
    ax.legend(fontsize=8)
    return fig


DRAWERS = {  # file name suffix: the function drawing that figure
    "speedup": _speedup,
    "acceptance": _acceptance,
    "e2e_cdf": _cdf("e2e", "end-to-end latency (s)"),
    "ttft_cdf": _cdf("ttft", "time to first token (s)"),
    "speedup_vs_alpha": _speedup_vs_alpha,
}


def _suffixes(data: dict) -> list[str]:
    kind = data["config"]["kind"]
    if kind == "offline":
        return ["speedup"] + (["acceptance"] if speculative_histograms(data["results"]) else [])
    if kind == "serve":
        return ["e2e_cdf", "ttft_cdf"]
    if kind == "sweep":
        return ["speedup_vs_alpha"]
    return []  # gpu: its figures are tables in RESULTS.md


def plot_names(data: dict, stem: str) -> list[str]:
    """The PNGs ``draw`` makes of one benchmark JSON named ``stem``."""
    return [f"{stem}_{suffix}.png" for suffix in _suffixes(data)]


def draw(data: dict, folder: str | Path, stem: str) -> list[Path]:
    """Draw every plot of one benchmark JSON into ``folder``; returns the paths written."""
    plt = _plt()
    out = []
    for suffix, name in zip(_suffixes(data), plot_names(data, stem)):
        fig = DRAWERS[suffix](plt, data)
        out.append(_save(fig, folder, name))
        plt.close(fig)
    return out


def command_plots(args, data: dict) -> None:
    """A benchmark command's ``--plots DIR``: its plots, named after ``--output`` (else after its kind)."""
    if args.plots:
        stem = Path(args.output).stem if args.output else data["config"]["kind"]
        for path in draw(data, args.plots, stem):
            print(f"wrote {path}", file=sys.stderr)
