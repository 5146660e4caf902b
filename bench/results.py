"""Regenerate bench/RESULTS.md (and the plots) from the benchmark JSONs in bench/results/.

    python -m hedgerow.bench.results                 # same as `hedgerow bench report`
    python -m hedgerow.bench.results --no-plots      # only the markdown
    python -m hedgerow.bench.results --check         # exit 1 if bench/RESULTS.md is not what the JSONs give

RESULTS.md is generated, never edited by hand: every figure, and every statement about the issue's
targets, comes from the JSONs, which record the command line and the machine of their run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hedgerow.bench.common import fmt, markdown_table

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"

# The acceptance configuration, and its targets.
TARGET_CONFIG = {"prompts": "humaneval", "num_prompts": 10, "max_new_tokens": 128, "greedy": True,
                 "target_device": "cpu", "embedded_pair": True}
TARGET_TEXT = "embedded pair, CPU, greedy, the first 10 HumanEval prompts, 128 new tokens"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="folder of benchmark JSONs (default: bench/results)")
    p.add_argument("--output", default=str(RESULTS_MD), help="markdown to write (default: bench/RESULTS.md)")
    p.add_argument("--no-plots", action="store_true", help="do not regenerate the PNGs next to the JSONs")
    p.add_argument("--check", action="store_true", help="only check that --output is current (exit 1 if not)")


def load(folder: str | Path) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "config" in data and "kind" in data["config"]:
            out.append((path.stem, data))
    return out


# --- sections -----------------------------------------------------------------------------------
def _machine(cfg: dict) -> str:
    m = cfg["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads){gpu}; Python {m['python']}, "
            f"torch {m['torch']}, transformers {m['transformers']}; run started {cfg['started']}"
            + (f"; 1-min load average {m['load_average_1min_at_start']} at start, {m['load_average_1min']} at end"
               if m.get("load_average_1min_at_start") is not None else ""))


def _header(stem: str, data: dict, rel: str) -> list[str]:
    cfg = data["config"]
    made = []
    if "--draft /tmp/random-draft" in cfg["command"]:
        made = ["`/tmp/random-draft` (the embedded draft's shape and tokenizer, random weights) is made by "
                "`python -m hedgerow.bench.random_draft /tmp/random-draft`.", ""]
    return [
        f"Produced by (`{rel}/{stem}.json`):",
        "",
        "```bash",
        cfg["command"],
        "```",
        "",
        *made,
        f"Machine: {_machine(cfg)}.",
        "",
    ]


def _by_name(results: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in results}


def best_speculative(results: list[dict]) -> dict | None:
    """The fastest Hedgerow speculative mode among those whose output was checked equal to ar's
    (greedy) or not checkable (sampling)."""
    spec = [r for r in results if r["kind"] == "engine" and r["name"] != "ar" and r["outputs_match_ar"] is not False]
    return max(spec, key=lambda r: r["tokens_per_second"] or 0.0, default=None)


def targets(results: list[dict]) -> list[tuple[str, float, float | None, str]]:
    """(what, required ratio, measured ratio or None, how measured)."""
    by = _by_name(results)
    best = best_speculative(results)
    ar, hf, hfa = by.get("ar"), by.get("hf"), by.get("hf-assisted")

    def r(a, b):
        return a["tokens_per_second"] / b["tokens_per_second"] if a and b and b["tokens_per_second"] else None

    name = best["name"] if best else "—"
    return [
        ("best speculative mode ≥ 2.0× plain decoding", 2.0, r(best, ar), f"{name} / ar"),
        ("best speculative mode ≥ 1.5× HF assisted generation", 1.5, r(best, hfa), f"{name} / hf-assisted"),
        ("plain decoding ≥ 1.0× HF generate", 1.0, r(ar, hf), "ar / hf"),
    ]


def _embedded(cfg: dict) -> bool:
    """Both models are the embedded pair (a run may name only --draft: then the target alone is)."""
    words = cfg["command"].split()
    return bool(cfg.get("embedded_pair")) and "--target" not in words and "--draft" not in words


def _matches_target(cfg: dict) -> bool:
    return (cfg["kind"] == "offline" and _embedded(cfg)
            and all(cfg.get(k) == v for k, v in TARGET_CONFIG.items() if k != "embedded_pair"))


def target_section(runs: list[tuple[str, dict]]) -> list[str]:
    lines = ["## Where we stand against the issue's targets", "",
             f"Targets apply to the configuration {TARGET_TEXT}; ratios of tokens/s measured within one run. "
             "One row per run of that configuration that measured at least one of the ratios; 'best' is the "
             "fastest Hedgerow speculative mode whose output equals plain decoding's.", ""]
    matching = [(stem, d) for stem, d in runs if _matches_target(d["config"])]
    assessed = [(stem, d, targets(d["results"])) for stem, d in matching]
    assessed = [(stem, d, t) for stem, d, t in assessed if any(got is not None for _, _, got, _ in t)]
    if not assessed:
        return lines + ["No run in bench/results has that configuration yet: the targets are not assessed.", ""]
    specs = assessed[0][2]
    headers = ["run", "best mode", "best / ar (≥ 2.0×)", "best / hf-assisted (≥ 1.5×)", "ar / hf (≥ 1.0×)", "met"]
    rows, best = [], [None] * len(specs)
    for stem, data, ts in assessed:
        met = 0
        cells = []
        for i, (_, need, got, _) in enumerate(ts):
            ok = got is not None and got >= need
            met += ok
            cells.append("—" if got is None else f"{got:.2f}× ({'met' if ok else 'not met'})")
            if got is not None and (best[i] is None or got > best[i][0]):
                best[i] = (got, stem)
        mode = best_speculative(data["results"])
        measured = sum(got is not None for _, _, got, _ in ts)
        rows.append([f"`{stem}`", mode["name"] if mode else "—"] + cells + [f"{met} of {measured} measured"])
    lines += [markdown_table(headers, rows), ""]
    for (what, need, _, _), b in zip(specs, best):
        if b is None:
            lines.append(f"- {what}: not measured.")
        else:
            lines.append(f"- {what}: {'met' if b[0] >= need else 'not met'}; best measured {b[0]:.2f}× "
                         f"(`{b[1]}`).")
    lines.append("")
    for stem, data, _ in assessed:
        mismatched = [r["name"] for r in data["results"] if r["outputs_match_ar"] is False]
        if mismatched:
            lines += [f"`{stem}`: output differs from plain decoding for {', '.join(mismatched)} "
                      "(excluded from 'best mode').", ""]
    return lines


def offline_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, results = data["config"], data["results"]
    by = _by_name(results)
    if _embedded(cfg):
        target, draft = "the embedded pair (server/embedded)", ""
    else:
        target, draft = cfg["target"], f", draft {cfg['draft']}"
    sampling = "greedy" if cfg["greedy"] else ", ".join(f"{k} {v}" for k, v in cfg["sampling"].items())
    lines = [f"## Offline speedup: `{stem}`", ""] + _header(stem, data, rel) + [
        f"Models: target {target}{draft}; {cfg['target_device']}, {cfg['dtype']}. Workload: {cfg['prompts']}, "
        f"{cfg['num_prompts']} prompts ({min(cfg['prompt_tokens'])}–{max(cfg['prompt_tokens'])} prompt tokens), "
        f"up to {cfg['max_new_tokens']} new tokens, {sampling}, {cfg['repeats']} repeat(s) after "
        f"{cfg['warmup']} warm-up prompt(s). Batch 1, one request at a time, contenders interleaved prompt by prompt.",
        "",
    ]
    headers = ["contender", "tokens/s", "× ar", "× hf", "× hf-assisted", "mean accepted length", "acceptance rate",
               "same tokens as ar", "tokens", "seconds"]
    rows = []

    def vs(r: dict, name: str) -> str:
        o = by.get(name)
        return fmt(r["tokens_per_second"] / o["tokens_per_second"], 2, "×") if o and o["tokens_per_second"] else "—"

    for r in results:
        rows.append([r["name"], fmt(r["tokens_per_second"], 1), fmt(r["speedup_vs_ar"], 2, "×"), vs(r, "hf"),
                     vs(r, "hf-assisted"), fmt(r["mean_accepted_length"]), fmt(r["acceptance_rate"]),
                     fmt(r["outputs_match_ar"]), r["generated_tokens"], fmt(r["wall_seconds"], 2)])
    lines += [markdown_table(headers, rows), ""]
    lines += ["Mean accepted length: tokens kept per verify step, the target's own token included (ar: 1). "
              "Acceptance rate: accepted / drafted tokens. Null for the transformers baselines.", ""]
    hists = [r for r in results if r.get("acceptance_length_histogram") and r["name"] != "ar"]
    if hists:
        longest = max(int(k) for r in hists for k in r["acceptance_length_histogram"])
        lines += ["Acceptance-length histogram (verify steps that kept k tokens):", "",
                  markdown_table(["contender"] + [str(k) for k in range(1, longest + 1)],
                                 [[r["name"]] + [r["acceptance_length_histogram"].get(str(k), 0)
                                                 for k in range(1, longest + 1)] for r in hists]), ""]
    rolled = [r for r in results if r.get("rollback_tokens") is not None and r["name"] != "ar"]
    if rolled:
        lines += ["Rollback: drafted tokens thrown away (rejected drafts, and hedge branches that missed), "
                  "hedge branches drafted during verification and those that came true:", "",
                  markdown_table(["contender", "rollback tokens", "rollback per generated token", "branches",
                                  "branch hits"],
                                 [[r["name"], r["rollback_tokens"],
                                   fmt(r["rollback_tokens"] / r["generated_tokens"] if r["generated_tokens"] else None),
                                   r["branches"], r["branch_hits"]] for r in rolled]), ""]
    lines += [f"![speedup](results/{stem}_speedup.png)"]
    if hists:
        lines += [f"![acceptance](results/{stem}_acceptance.png)"]
    lines += [""] + time_section(data)
    return lines


def time_section(data: dict) -> list[str]:
    """Where the time goes: the engine's phases over the timed runs, then the profile of one prompt."""
    engine = [r for r in data["results"] if r.get("phase_seconds")]
    lines = []
    if engine:
        known = ["prefill", "draft", "verify", "accept", "commit"]
        seen = {k for r in engine for k in r["phase_seconds"]}
        phases = [k for k in known if k in seen] + sorted(seen - set(known))
        rows = []
        for r in engine:
            wall = r["wall_seconds"]
            p = r["phase_seconds"]
            other = wall - sum(p.get(k, 0.0) for k in phases)
            cells = [f"{p.get(k, 0.0):.2f} s ({100 * p.get(k, 0.0) / wall:.0f}%)" for k in phases]
            steps = r.get("verify_steps") or 0
            per_step = f"{1e3 * wall / steps:.2f}" if steps else "—"
            rows.append([r["name"]] + cells + [f"{other:.2f} s ({100 * other / wall:.0f}%)", per_step])
        lines += ["### Where the time goes", "",
                  "Engine phases (`engine.times.phases`) summed over the timed runs; 'outside' is the rest of the "
                  "wall time (request admission, the generate loop, bookkeeping between steps).", "",
                  markdown_table(["mode"] + phases + ["outside the phases", "ms per step"], rows), ""]
        for r in engine:
            if r["name"] == "ar":
                continue
            p = r["phase_seconds"]
            ar = _by_name(data["results"]).get("ar")
            if ar and ar.get("phase_seconds") and r.get("verify_steps") and ar.get("verify_steps"):
                d_step = 1e3 * p.get("draft", 0.0) / r["verify_steps"]
                v_step = 1e3 * p.get("verify", 0.0) / r["verify_steps"]
                ar_step = 1e3 * ar["phase_seconds"].get("verify", 0.0) / ar["verify_steps"]
                lines.append(f"- {r['name']}: per step, drafting {d_step:.2f} ms and verifying {v_step:.2f} ms, "
                             f"against {ar_step:.2f} ms for one plain-decoding target pass; each step keeps "
                             f"{fmt(r['mean_accepted_length'])} tokens.")
        lines.append("")
    prof = data.get("profile")
    if prof:
        lines += ["Profile of one generation (the first prompt) per contender: Python functions by own time "
                  "(cProfile), then PyTorch operators by self CPU time (torch profiler, a second run).", ""]
        for name, p in prof.items():
            total = p["seconds_profiled"] or 1.0
            funcs = "; ".join(f"`{f['function']}` {100 * f['own_seconds'] / total:.0f}%"
                              for f in p["python_functions"][:6])
            op_total = p["torch_ops_seconds"] or 1.0
            ops = "; ".join(f"`{o['op']}` {100 * o['self_seconds'] / op_total:.0f}%" for o in p["torch_ops"][:6])
            layers = "; ".join(f"{k} {100 * v / total:.0f}%" for k, v in p.get("own_seconds_by_layer", {}).items()
                               if v / total >= 0.005)
            lines += [f"- **{name}** ({p['generated_tokens']} tokens, {p['seconds_profiled']:.2f} s under cProfile). "
                      f"By layer: {layers}.", f"  Top functions: {funcs}.", f"  Operators: {ops}."]
        lines.append("")
    return lines


def serve_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, results = data["config"], data["results"]
    load = f"{cfg['duration']:g} s" if cfg.get("duration") else f"{cfg['requests']} requests"
    loop = f"open loop at {cfg['rate']:g} req/s" if cfg.get("rate") else "closed loop"
    lines = [f"## Serving under load: `{stem}`", ""] + _header(stem, data, rel)
    if cfg.get("server_command"):
        lines += ["Server:", "", "```bash", cfg["server_command"], "```", ""]
    server = cfg.get("server") or {}
    lines += [f"Client: {cfg['client']}; {loop}, {load} per concurrency and mode; {cfg['prompts']} prompts, "
              f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']:g}"
              f"{', EOS ignored' if cfg.get('ignore_eos') else ''}. Server models: target {server.get('target', '?')}, "
              f"draft {server.get('draft', '?')}, max batch {server.get('max_batch_size', '?')}.", ""]
    headers = ["concurrency", "speculation", "tokens/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
               "e2e p50/p90/p99 s", "tokens/s vs off", "e2e p50 speedup", "failed"]

    def ms(d):
        return " / ".join(fmt(None if d[q] is None else 1e3 * d[q], 1) for q in ("p50", "p90", "p99"))

    def sec(d):
        return " / ".join(fmt(d[q], 2) for q in ("p50", "p90", "p99"))

    rows = [[r["concurrency"], r["speculation"], fmt(r["tokens_per_second"], 1), fmt(r["requests_per_second"], 2),
             ms(r["ttft_seconds"]), ms(r["itl_seconds"]), sec(r["e2e_seconds"]),
             fmt(r["vs_off"]["tokens_per_second"], 2, "×") if r["vs_off"] else "—",
             fmt(r["vs_off"]["e2e_p50_speedup"], 2, "×") if r["vs_off"] else "—", r["failed"]] for r in results]
    lines += [markdown_table(headers, rows), "",
              "ITL: a stream message of k tokens after a gap g counts as k tokens g / k apart.", "",
              f"![e2e latency CDF](results/{stem}_e2e_cdf.png)", f"![TTFT CDF](results/{stem}_ttft_cdf.png)", ""]
    return lines


def sweep_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, c = data["config"], data["step_costs"]
    t, d = cfg["target_shape"], cfg["draft_shape"]
    lines = [f"## Oracle-acceptance sweep (systems benchmark): `{stem}`", ""] + _header(stem, data, rel) + [
        f"A systems benchmark, not a model benchmark: random-weight Llama models of real shapes — target "
        f"{t['name']} ({t['params'] / 1e6:.1f}M parameters: {t['layers']} layers, hidden {t['hidden']}), draft "
        f"{d['name']} ({d['params'] / 1e6:.1f}M: {d['layers']} layers, hidden {d['hidden']}), vocabulary {t['vocab']}; "
        f"{cfg['device']}, {cfg['dtype']}. The draft model runs, but proposes the target's greedy continuation "
        f"corrupted at rate 1 − α per token; γ = {cfg['draft_tokens']}, {cfg['num_prompts']} random prompts of "
        f"{cfg['prompt_len']} tokens, {cfg['max_new_tokens']} new tokens, {cfg['repeats']} repeat(s).", "",
        f"Step costs at batch 1 (context {c['context']}, median): target pass of 1 token {1e3 * c['t_target']:.2f} ms, "
        f"of γ+1 = {cfg['draft_tokens'] + 1} tokens {1e3 * c['t_verify']:.2f} ms, draft pass of 1 token "
        f"{1e3 * c['t_draft']:.2f} ms; c = t_draft / t_target = {c['c']:.3f}.", "",
        "Ideal (algorithms.md §8): (1 − α^{γ+1}) / ((1 − α)(γc + 1)) with the realised α; 'ideal, verify cost' "
        "charges the verify pass its measured cost instead of one target step. 'Kept' = measured / ideal.", "",
    ]
    headers = ["α set", "α realised", "tokens/s", "measured speedup", "ideal (§8)", "kept", "ideal, verify cost",
               "kept", "mean accepted length (expected)", "same tokens as ar"]
    rows = []
    for r in data["results"]:
        if r.get("alpha") is None:
            rows.append(["ar", "—", fmt(r["tokens_per_second"], 1), "1.00×", "—", "—", "—", "—", "1", "—"])
            continue
        rows.append([f"{r['alpha']:g}", fmt(r["alpha_realised"], 3), fmt(r["tokens_per_second"], 1),
                     fmt(r["speedup_vs_ar"], 2, "×"), fmt(r["ideal_speedup"], 2, "×"), fmt(r["kept_of_ideal"], 2),
                     fmt(r["ideal_speedup_verify_cost"], 2, "×"), fmt(r["kept_of_ideal_verify_cost"], 2),
                     f"{fmt(r['mean_accepted_length'])} ({fmt(r['expected_tokens_per_step'])})",
                     fmt(r["outputs_match_ar"])])
    lines += [markdown_table(headers, rows), "", f"![speedup vs alpha](results/{stem}_speedup_vs_alpha.png)", ""]
    return lines


SECTIONS = {"offline": offline_section, "serve": serve_section, "sweep": sweep_section}


def render(folder: str | Path = RESULTS_DIR) -> str:
    runs = load(folder)
    rel = "bench/results"
    lines = [
        "# Hedgerow benchmark results",
        "",
        "<!-- generated by `python -m hedgerow.bench.results` (or `hedgerow bench report`) from bench/results/*.json; "
        "do not edit by hand -->",
        "",
        "Generated from the JSON files in `bench/results/` by `python -m hedgerow.bench.results` (same as "
        "`hedgerow bench report`); each section names the command that produced its JSON and the machine it ran "
        "on. Every figure is a ratio measured within one run: same machine, same models, same prompts.",
        "",
    ]
    lines += target_section(runs)
    order = {"offline": 0, "sweep": 1, "serve": 2}
    for stem, data in sorted(runs, key=lambda x: (order.get(x[1]["config"]["kind"], 9), x[0])):
        lines += SECTIONS[data["config"]["kind"]](stem, data, rel)
    if not runs:
        lines += ["No benchmark JSONs yet.", ""]
    return "\n".join(lines).rstrip() + "\n"


def run(args) -> int:
    text = render(args.results_dir)
    out = Path(args.output)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is stale: run python -m hedgerow.bench.results", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_plots:
        from hedgerow.bench.plots import plots_for

        for stem, data in load(args.results_dir):
            for path in plots_for(data, args.results_dir, stem):
                print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hedgerow.bench.results", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
