"""RESULTS.md's section of one benchmark JSON: how it was produced, on what, and its tables (from
``bench/tables.py``, the ones the benchmark commands print)."""

from __future__ import annotations

from hedgerow.bench import tables
from hedgerow.bench.plots import plot_names
from hedgerow.bench.report_targets import embedded
from hedgerow.bench.tables import fmt


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


def _plots(stem: str, data: dict) -> list[str]:
    return ["Plots: " + ", ".join(f"`{name}`" for name in plot_names(data, stem)) + ".", ""]


def offline_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, results = data["config"], data["results"]
    if embedded(cfg):
        target, draft = "the embedded pair (server/embedded)", ""
    else:
        target, draft = cfg["target"], f", draft {cfg['draft']}"
    sampling = "greedy" if cfg["greedy"] else ", ".join(f"{k} {v}" for k, v in cfg["sampling"].items())
    lines = [f"## Offline speedup: `{stem}`", ""] + _header(stem, data, rel) + [
        f"Models: target {target}{draft}; {cfg['target_device']}, {cfg['dtype']}. Workload: {cfg['prompts']}, "
        f"{cfg['num_prompts']} prompts ({min(cfg['prompt_tokens'])}–{max(cfg['prompt_tokens'])} prompt tokens), "
        f"up to {cfg['max_new_tokens']} new tokens, {sampling}, {cfg['repeats']} repeat(s) after "
        f"{cfg['warmup']} warm-up prompt(s). Batch 1, one request at a time, contenders interleaved prompt by prompt."
        + (f" A background load of {cfg['background_load']} busy process(es) ran for the whole run "
           "(`--background-load`)." if cfg.get("background_load") else ""),
        "",
        tables.offline(results),
        "",
        "Mean accepted length: emitted tokens per verify step, the target's own token included (plain: 1). "
        "Acceptance rate: accepted draft tokens / drafted tokens. Null for the transformers baselines.",
        "",
    ]
    if data.get("pass_times"):
        any_times = next(iter(data["pass_times"].values()))
        lines += [f"Pass times per model implementation (batch 1, after {any_times['context']} cached rows; median of "
                  f"{any_times['samples']} passes, the implementations taking turns; forward, logits, argmax and the "
                  "host copy, as a step does them):", "", tables.pass_times(data["pass_times"]), ""]
    histogram = tables.acceptance_histogram(results)
    if histogram:
        lines += ["Acceptance-length histogram (verify steps that emitted k tokens):", "", histogram, ""]
    rollback = tables.rollback(results)
    if rollback:
        lines += ["Rollback: drafted tokens thrown away (rejected drafts, and hedge branches that missed), "
                  "hedge branches drafted during verification and those that came true:", "", rollback, ""]
    return lines + _plots(stem, data) + time_section(data)


def time_section(data: dict) -> list[str]:
    """Where the time goes: the engine's phases over the timed runs, then the profile of one prompt."""
    lines = []
    phases = tables.phases(data["results"])
    if phases:
        lines += ["### Where the time goes", "",
                  "Engine phases (`engine.times.phases`) summed over the timed runs; 'outside' is the rest of the "
                  "wall time (request admission, the generate loop, bookkeeping between steps).", "",
                  phases, ""]
        plain = next((r for r in data["results"] if r["name"] == "plain"), None)
        for r in data["results"]:
            if not r.get("phase_seconds") or r["name"] == "plain":
                continue
            p = r["phase_seconds"]
            if plain and plain.get("phase_seconds") and r.get("verify_steps") and plain.get("verify_steps"):
                d_step = 1e3 * p.get("draft", 0.0) / r["verify_steps"]
                v_step = 1e3 * p.get("verify", 0.0) / r["verify_steps"]
                plain_step = 1e3 * plain["phase_seconds"].get("verify", 0.0) / plain["verify_steps"]
                lines.append(f"- {r['name']}: per step, drafting {d_step:.2f} ms and verifying {v_step:.2f} ms, "
                             f"against {plain_step:.2f} ms for one plain-decoding target pass; each step emits "
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
    cfg = data["config"]
    load = f"{cfg['duration']:g} s" if cfg.get("duration") else f"{cfg['requests']} requests"
    loop = f"open loop at {cfg['rate']:g} req/s" if cfg.get("rate") else "closed loop"
    lines = [f"## Serving under load: `{stem}`", ""] + _header(stem, data, rel)
    several = len(cfg.get("targets") or []) > 1
    if several:
        lines += _targets(cfg)
    elif cfg.get("server_command"):
        lines += ["Server:", "", "```bash", cfg["server_command"], "```", ""]
    server = cfg.get("server") or {}
    lines += [f"Client: {cfg['client']}; {loop}, {load} per concurrency and mode; {cfg['prompts']} prompts, "
              f"{cfg['max_new_tokens']} new tokens, temperature {cfg['temperature']:g}"
              f"{', EOS ignored' if cfg.get('ignore_eos') else ''}. Server models: target {server.get('target', '?')}, "
              f"draft {server.get('draft', '?')}, max batch {server.get('max_batch_size', '?')}.", "",
              tables.serve(data["results"]), "",
              "ITL: a stream message of k tokens after a gap g counts as k tokens g / k apart.", ""]
    if several:
        ref = cfg["targets"][0]["name"]
        lines += [f"Side by side, against the first target (`{ref}`) at the same concurrency and mode: tokens/s "
                  f"(× {ref}) and end-to-end p50 (speedup: {ref}'s / the target's, above 1 when the target is "
                  "faster).",
                  "", tables.serve_reference(data["results"]), ""] + _reference_lines(data) + [""]
    return lines + _plots(stem, data)


def _targets(cfg: dict) -> list[str]:
    """The targets of a serve run of several: how each was started, and the machine's load around it."""
    started = all(t.get("started") for t in cfg["targets"])
    lines = ["Targets, measured one after the other" + (
        " (each started by the benchmark, `--start`, and stopped with SIGTERM before the next, so only one "
        "server was on the machine at a time)" if started else "") + "; load averages (1, 5, 15 min, as `uptime` "
        "shows them) when each began and when its measurement ended:", ""]
    for t in cfg["targets"]:
        before, after = (" / ".join(f"{x:.2f}" for x in t[k]) if t.get(k) else "—"
                         for k in ("load_average_before", "load_average_after"))
        status = f"; exit status {t['server_exit_status']}" if t.get("server_exit_status") is not None else ""
        command = f": `{t['server_command']}`" if t.get("server_command") else ""
        lines.append(f"- `{t['name']}` ({t['client']} {t['address']}){command}; load {before} → {after}{status}")
    return lines + [""]


def _reference_lines(data: dict) -> list[str]:
    """Per target after the first, per mode: the range of its tokens/s ratio to the first over the
    concurrencies, and the ratio at the highest one."""
    results, ref = data["results"], data["config"]["targets"][0]["name"]
    top = max(r["concurrency"] for r in results)
    lines = []
    for t in data["config"]["targets"][1:]:
        parts = []
        for mode in data["config"]["spec_modes"]:
            ratios = {r["concurrency"]: r["vs_reference"]["tokens_per_second"] for r in results
                      if r["target"] == t["name"] and r["speculation"] == mode and r.get("vs_reference")
                      and r["vs_reference"]["tokens_per_second"] is not None}
            if ratios:
                parts.append(f"{mode} {min(ratios.values()):.2f}×–{max(ratios.values()):.2f}× "
                             f"({fmt(ratios.get(top), 2, '×')} at concurrency {top})")
        failed = sum(r["failed"] for r in results if r["target"] == t["name"])
        if parts:
            lines.append(f"- `{t['name']}`: tokens/s {'; '.join(parts)} of `{ref}`'s; {failed} failed request(s).")
    return lines


def sweep_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg = data["config"]
    t, d = cfg["target_shape"], cfg["draft_shape"]
    return [f"## Oracle-acceptance sweep (systems benchmark): `{stem}`", ""] + _header(stem, data, rel) + [
        f"A systems benchmark, not a model benchmark: random-weight Llama models of real shapes — target "
        f"{t['name']} ({t['params'] / 1e6:.1f}M parameters: {t['layers']} layers, hidden {t['hidden']}), draft "
        f"{d['name']} ({d['params'] / 1e6:.1f}M: {d['layers']} layers, hidden {d['hidden']}), vocabulary {t['vocab']}; "
        f"{cfg['device']}, {cfg['dtype']}. The draft model runs, but proposes the target's greedy continuation "
        f"corrupted at rate 1 − α per token; γ = {cfg['draft_tokens']} draft tokens per step, "
        f"{cfg['num_prompts']} random prompts of {cfg['prompt_len']} tokens, {cfg['max_new_tokens']} new tokens, "
        f"{cfg['repeats']} repeat(s).", "",
        tables.step_costs(data), "",
        "Ideal: the expected-speedup model of `docs/algorithms.md`, (1 − α^{γ+1}) / ((1 − α)(γc + 1)) with the "
        "realised α; 'ideal, verify cost' charges the verify pass its measured cost instead of one target step. "
        "'Kept' = measured / ideal.", "",
        tables.sweep(data["results"]), "",
    ] + _plots(stem, data)


def gpu_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, results = data["config"], data["results"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "skipped")}
    lines = [f"## GPU check: `{stem}`", ""] + _header(stem, data, rel) + [
        f"Device {cfg['device']} (CUDA {cfg['torch_cuda'] or 'absent'}; the CUDA kernels "
        f"{'available' if cfg['kernels_available'] else 'unavailable'}); {cfg['seconds']:g} s of a "
        f"{cfg['budget_seconds']:g} s budget; {counts['passed']} parts passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped. Models are built from configs with random weights (no download).", "",
        tables.gpu(results), "",
    ]
    by = {r["part"]: r["figures"] for r in results if r["status"] != "skipped"}
    if by.get("kernels", {}).get("rows"):
        lines += ["The kernel against its reference (float64), per problem:", "",
                  tables.gpu_kernels(by["kernels"]["rows"]), ""]
    if by.get("sweep", {}).get("sweep"):
        sweep = by["sweep"]["sweep"]
        lines += [f"Oracle sweep (`{sweep['config']['command']}`):", "", tables.step_costs(sweep), "",
                  tables.sweep(sweep["results"]), ""]
    if by.get("attention-timing", {}).get("rows"):
        lines += ["Tree attention at 8B shapes (32 query, 8 key/value heads, head dim 128, bf16; median of CUDA-event "
                  "timings):", "", tables.gpu_attention(by["attention-timing"]["rows"]), ""]
    if by.get("pass-times", {}).get("pass_times"):
        lines += ["Pass times, 8B target and 1B draft, bf16, batch 1:", "",
                  tables.pass_times(by["pass-times"]["pass_times"]), ""]
    return lines


def soak_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg, res = data["config"], data["results"]
    lines = [f"## Soak: `{stem}`", ""] + _header(stem, data, rel)
    if cfg.get("server_command"):
        lines += ["Server (started by the soak, stopped with SIGTERM: exit status "
                  f"{res.get('server_exit_status')}):", "", "```bash", cfg["server_command"], "```", ""]
    modes = ", ".join(f"{m} {n}" for m, n in res["by_mode"].items())
    lines += [f"{cfg['concurrency']} clients streaming for {cfg['duration']:g} s after a {cfg['warmup']:g} s warm-up "
              f"of the same load; {cfg['prompts']} prompts, up to {cfg['max_new_tokens']} new tokens each. Requests by "
              f"mode: {modes}; {res['sampled']} sampled (temperature 0.8, top-p 0.95), the rest greedy; "
              f"{cfg['cancel_share']:.0%} cancelled and {cfg['disconnect_share']:.0%} disconnected by their client "
              "mid-stream. Requests, endings and errors count the warm-up too; tokens/s and TTFT only what was sent "
              "after it. Server RSS from /proc/PID/status.", "", tables.soak(res), ""]
    if res["errors"]:
        lines += ["Errors: " + "; ".join(f"`{e}`" for e in res["error_samples"]) + ".", ""]
    return lines


def drafts_section(stem: str, data: dict, rel: str) -> list[str]:
    cfg = data["config"]
    return [f"## Draft shapes: `{stem}`", ""] + _header(stem, data, rel) + [
        f"Each draft against the target: acceptance of greedy chains of γ = {cfg['draft_tokens']} model tokens "
        f"(no n-gram nodes, fixed size) over the first {cfg['num_prompts']} {cfg['prompts']} prompts, up to "
        f"{cfg['max_new_tokens']} new tokens each, to end of text; cost per draft token as chains draft it (a greedy "
        f"run of γ tokens), the lone pass beside it, and a target pass of one token, after {cfg['context']} cached "
        f"rows, medians with every pair's passes interleaved (compile {cfg['compile']}); c = draft per token / "
        "target pass. Drafts with random weights are there for their cost (their acceptance is ~0 by construction); "
        "trained drafts other than the embedded pair's are described where they were trained (the embedded pair's "
        "model card, server/embedded/MODEL_CARD.md, for its candidates).",
        "", tables.drafts(data["results"]), ""] + (
        ["Random-weight drafts made by:", "", "```bash", *(r["random_weights"] for r in data["results"]
                                                          if r.get("random_weights")), "```", ""]
        if any(r.get("random_weights") for r in data["results"]) else [])


SECTIONS = {"offline": offline_section, "serve": serve_section, "sweep": sweep_section, "gpu": gpu_section,
            "soak": soak_section, "drafts": drafts_section}
