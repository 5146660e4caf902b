"""Every results table, rendered here once: the benchmark commands print them and RESULTS.md
(``bench/report_sections.py``) embeds the same text. Each takes the ``results`` of a benchmark JSON.
"""

from __future__ import annotations

from hedgerow.bench.common import speculative_histograms


def fmt(x, digits: int = 2, suffix: str = "") -> str:
    """A table cell: numbers rounded, None as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- offline ------------------------------------------------------------------------------------
def offline(results: list[dict]) -> str:
    """Speed, ratios to plain decoding and the transformers baselines, acceptance, losslessness per contender."""
    by = {r["name"]: r for r in results}

    def vs(r: dict, name: str) -> str:
        o = by.get(name)
        return fmt(r["tokens_per_second"] / o["tokens_per_second"], 2, "×") if o and o["tokens_per_second"] else "—"

    headers = ["contender", "tokens/s", "× plain", "× hf", "× hf-assisted", "mean accepted length",
               "acceptance rate", "same tokens as plain", "tokens", "seconds"]
    rows = [[r["name"], fmt(r["tokens_per_second"], 1), fmt(r["speedup_vs_plain"], 2, "×"), vs(r, "hf"),
             vs(r, "hf-assisted"), fmt(r["mean_accepted_length"]), fmt(r["acceptance_rate"]),
             fmt(r["outputs_match_plain"]), r["generated_tokens"], fmt(r["wall_seconds"], 2)] for r in results]
    if any("implementation" in r for r in results):  # runs that record it: the model code, and which plain
        headers += ["model code", "plain reference"]
        for row, r in zip(rows, results):
            code = r["implementation"] if r["kind"] == "engine" else f"{r['implementation']} generate"
            row += [code, fmt(r.get("plain_reference"))]
    return markdown_table(headers, rows)


def acceptance_histogram(results: list[dict]) -> str | None:
    """Verify steps that emitted k tokens, per speculative contender (None when there is none)."""
    hists = speculative_histograms(results)
    if not hists:
        return None
    longest = max(int(k) for r in hists for k in r["acceptance_length_histogram"])
    return markdown_table(["contender"] + [str(k) for k in range(1, longest + 1)],
                          [[r["name"]] + [r["acceptance_length_histogram"].get(str(k), 0)
                                          for k in range(1, longest + 1)] for r in hists])


def rollback(results: list[dict]) -> str | None:
    """Drafted tokens thrown away and hedge branches, per speculative contender (None when there is none)."""
    rolled = [r for r in results if r.get("rollback_tokens") is not None and r["name"] != "plain"]
    if not rolled:
        return None
    return markdown_table(["contender", "rollback tokens", "rollback per generated token", "branches", "branch hits"],
                          [[r["name"], r["rollback_tokens"],
                            fmt(r["rollback_tokens"] / r["generated_tokens"] if r["generated_tokens"] else None),
                            r["branches"], r["branch_hits"]] for r in rolled])


def phases(results: list[dict]) -> str | None:
    """The engine's phases summed over the timed runs, per engine mode (None without engine modes)."""
    engine = [r for r in results if r.get("phase_seconds")]
    if not engine:
        return None
    known = ["prefill", "draft", "verify", "accept", "commit"]
    seen = {k for r in engine for k in r["phase_seconds"]}
    names = [k for k in known if k in seen] + sorted(seen - set(known))
    rows = []
    for r in engine:
        wall = r["wall_seconds"]
        p = r["phase_seconds"]
        other = wall - sum(p.get(k, 0.0) for k in names)
        cells = [f"{p.get(k, 0.0):.2f} s ({100 * p.get(k, 0.0) / wall:.0f}%)" for k in names]
        steps = r.get("verify_steps") or 0
        per_step = f"{1e3 * wall / steps:.2f}" if steps else "—"
        rows.append([r["name"]] + cells + [f"{other:.2f} s ({100 * other / wall:.0f}%)", per_step])
    return markdown_table(["mode"] + names + ["outside the phases", "ms per step"], rows)


# --- serve --------------------------------------------------------------------------------------
def _targets(results: list[dict]) -> list[str]:
    """The targets of a serve run, in order (runs of one server before targets existed: none)."""
    return list(dict.fromkeys(r["target"] for r in results if "target" in r))


def serve(results: list[dict]) -> str:
    """Throughput and latency percentiles per concurrency and speculation mode (and target, in a run
    of several), with the ratios to plain decoding."""
    headers = ["concurrency", "speculation", "tokens/s", "req/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms",
               "e2e p50/p90/p99 s", "tokens/s vs plain", "e2e p50 speedup", "failed"]
    several = len(_targets(results)) > 1

    def ms(d):
        return " / ".join(fmt(None if d[q] is None else 1e3 * d[q], 1) for q in ("p50", "p90", "p99"))

    def sec(d):
        return " / ".join(fmt(d[q], 2) for q in ("p50", "p90", "p99"))

    rows = [[r["concurrency"], r["speculation"], fmt(r["tokens_per_second"], 1), fmt(r["requests_per_second"], 2),
             ms(r["ttft_seconds"]), ms(r["itl_seconds"]), sec(r["e2e_seconds"]),
             fmt(r["vs_plain"]["tokens_per_second"], 2, "×") if r["vs_plain"] else "—",
             fmt(r["vs_plain"]["e2e_p50_speedup"], 2, "×") if r["vs_plain"] else "—", r["failed"]] for r in results]
    if several:
        headers = ["target"] + headers
        rows = [[r["target"]] + row for r, row in zip(results, rows)]
    return markdown_table(headers, rows)


def serve_reference(results: list[dict]) -> str:
    """A run of several targets side by side: per concurrency and mode, each target's tokens/s and
    end-to-end p50, and for every target after the first its ratios to the first (tokens/s: target
    / reference; e2e p50 speedup: reference / target, > 1 when the target is faster)."""
    names = _targets(results)
    by = {(r["target"], r["concurrency"], r["speculation"]): r for r in results}
    levels = list(dict.fromkeys((r["concurrency"], r["speculation"]) for r in results))
    ref = names[0]
    headers = ["concurrency", "speculation"]
    for name in names:
        headers += [f"{name} tokens/s", f"{name} e2e p50 s"] if name == ref else [
            f"{name} tokens/s (× {ref})", f"{name} e2e p50 s (speedup)"]
    rows = []
    for c, mode in levels:
        row = [c, mode]
        for name in names:
            r = by.get((name, c, mode))
            if r is None:
                row += ["—", "—"]
                continue
            tps, e2e = fmt(r["tokens_per_second"], 1), fmt(r["e2e_seconds"]["p50"], 2)
            vs = r.get("vs_reference")
            if vs is not None:
                tps += f" ({fmt(vs['tokens_per_second'], 2, '×')})"
                e2e += f" ({fmt(vs['e2e_p50_speedup'], 2, '×')})"
            row += [tps, e2e]
        rows.append(row)
    return markdown_table(headers, rows)


# --- soak ---------------------------------------------------------------------------------------
def soak(results: dict) -> str:
    """One soak run: requests by ending, errors, throughput and TTFT after the warm-up, and the
    server's resident memory from the end of the warm-up to the end."""
    rss = results["server_rss_mib"]

    def ms(q):
        value = results["ttft_seconds"][q]
        return fmt(None if value is None else 1e3 * value, 0)

    memory = f"{fmt(rss['start'], 1)} → {fmt(rss['end'], 1)}" if rss["start"] is not None else "—"
    growth = fmt(None if rss["growth"] is None else 100 * rss["growth"], 2, "%")
    return markdown_table(
        ["requests", "completed / cancelled / disconnected", "errors", "tokens/s", "TTFT p50 / p90 / p99 ms",
         "server RSS MiB (start → end)", "RSS growth"],
        [[results["requests"], f"{results['completed']} / {results['cancelled']} / {results['disconnected']}",
          results["errors"], fmt(results["tokens_per_second"], 1), " / ".join(ms(q) for q in ("p50", "p90", "p99")),
          memory, growth]])


# --- sweep --------------------------------------------------------------------------------------
def sweep(results: list[dict]) -> str:
    """Measured speedup per oracle acceptance rate against the ideal, and how much of it is kept."""
    headers = ["α set", "α realised", "tokens/s", "measured speedup", "ideal", "kept", "ideal, verify cost",
               "kept", "mean accepted length (expected)", "same tokens as plain"]
    rows = []
    for r in results:
        if r.get("alpha") is None:
            rows.append([r["name"], "—", fmt(r["tokens_per_second"], 1), "1.00×", "—", "—", "—", "—", "1", "—"])
            continue
        rows.append([f"{r['alpha']:g}", fmt(r["alpha_realised"], 3), fmt(r["tokens_per_second"], 1),
                     fmt(r["speedup_vs_plain"], 2, "×"), fmt(r["ideal_speedup"], 2, "×"), fmt(r["kept_of_ideal"], 2),
                     fmt(r["ideal_speedup_verify_cost"], 2, "×"), fmt(r["kept_of_ideal_verify_cost"], 2),
                     f"{fmt(r['mean_accepted_length'])} ({fmt(r['expected_tokens_per_step'])})",
                     fmt(r["outputs_match_plain"])])
    return markdown_table(headers, rows)


def step_costs(data: dict) -> str:
    """The sweep's measured step costs, in one sentence."""
    c, g = data["step_costs"], data["config"]["draft_tokens"]
    return (f"Step costs at batch 1 (context {c['context']}, median): target pass of 1 token "
            f"{1e3 * c['t_target']:.2f} ms, of γ+1 = {g + 1} tokens {1e3 * c['t_verify']:.2f} ms, draft per "
            f"token {1e3 * c['t_draft']:.2f} ms; c = t_draft / t_target = {c['c']:.3f}.")


def pass_times(times: dict[str, dict]) -> str:
    """Per implementation: median draft, target and verify pass times at batch 1 and c (``pass_times``
    of an offline run, or of ``bench gpu``)."""
    def ms(x):
        return fmt(None if x is None else 1e3 * x, 2, " ms")

    rows = [[impl, t.get("compile") or "—", t.get("cuda_graphs") or "—", t["context"], ms(t.get("t_draft")),
             ms(t.get("t_draft_pass")), ms(t["t_target"]), f"{ms(t['t_verify'])} ({t['verify_tokens']} tokens)",
             fmt(t["c"], 3)] for impl, t in times.items()]
    # draft per token: as chains drafted in that run (one pass per token before greedy runs, whose
    # runs also record the lone pass)
    return markdown_table(["implementation", "compile", "CUDA graphs", "context", "draft per token", "draft pass alone",
                           "target pass", "verify pass (γ+1)", "c = draft / target"], rows)


def drafts(results: list[dict]) -> str:
    """``bench drafts``: each draft's shape, acceptance and cost per token against the target."""
    def ms(x):
        return fmt(None if x is None else 1e3 * x, 3, " ms")

    rows = [[f"`{r['name']}`" + (" (random weights)" if r.get("random_weights") else ""), r["layers"], r["hidden"], r["intermediate"], f"{r['parameters'] / 1e6:.2f} M",
             fmt(r["acceptance_rate"], 3), fmt(r["mean_accepted_length"], 2), ms(r["t_draft"]), ms(r["t_draft_pass"]),
             ms(r["t_target"]), fmt(r["c"], 3)] for r in results]
    return markdown_table(["draft", "layers", "hidden", "MLP", "parameters", "acceptance rate", "tokens per step",
                           "draft per token", "draft pass alone", "target pass", "c"], rows)


# --- gpu ----------------------------------------------------------------------------------------
def gpu(results: list[dict]) -> str:
    """Each part of ``bench gpu``: its status, time against its budget and figures; the CPU dry
    variant beside it when the run had no CUDA."""
    headers = ["part", "status", "seconds (budget)", "figures"]
    rows = [[f"`{r['part']}`", r["status"], f"{r['seconds']:.1f} ({r['budget_seconds']:g})", r["summary"]]
            for r in results]
    if any(r.get("dry") for r in results):
        headers += ["CPU dry run", "its figures"]
        for row, r in zip(rows, results):
            dry = r.get("dry")
            row += [f"{dry['status']} ({dry['seconds']:.1f} s)", dry["summary"]] if dry else ["—", "no CPU variant"]
    return markdown_table(headers, rows)


def gpu_kernels(rows: list[dict]) -> str:
    """The kernel against its float64 reference, problem by problem."""
    return markdown_table(
        ["dtype", "heads (q/kv)", "head dim", "prefixes", "tree sizes", "relative error", "tolerance",
         "max abs error", "within"],
        [[r["dtype"], r["heads"], r["head_dim"], ", ".join(map(str, r["prefix"])), ", ".join(map(str, r["nodes"])),
          f"{r['relative_error']:.1e}", f"{r['tolerance']:g}", f"{r['max_abs_error']:.1e}", fmt(r["ok"])]
         for r in rows])


def gpu_attention(rows: list[dict]) -> str:
    """Tree attention per size: SDPA with the dense tree mask against the CUDA kernel."""
    return markdown_table(
        ["batch", "tree nodes", "prefix", "SDPA ms", "kernel ms", "SDPA / kernel", "relative difference"],
        [[r["batch"], r["nodes"], r["prefix"], fmt(r["sdpa_ms"], 3), fmt(r["kernel_ms"], 3),
          fmt(r["sdpa_over_kernel"], 2, "×"), f"{r['relative_difference']:.1e}"] for r in rows])
