"""RESULTS.md's first section: where the offline runs stand against the speed targets that
bench/README.md sets for the embedded pair on the CPU."""

from __future__ import annotations

from hedgerow.bench.tables import markdown_table

# The configuration the speed targets of bench/README.md apply to.
TARGET_CONFIG = {"prompts": "humaneval", "num_prompts": 10, "max_new_tokens": 128, "greedy": True,
                 "target_device": "cpu", "embedded_pair": True}
TARGET_TEXT = "embedded pair, CPU, greedy, the first 10 HumanEval prompts, 128 new tokens"


def best_speculative(results: list[dict]) -> dict | None:
    """The fastest Hedgerow speculative mode among those whose output was checked equal to plain
    decoding's (greedy) or not checkable (sampling)."""
    spec = [r for r in results
            if r["kind"] == "engine" and r["name"] != "plain" and r["outputs_match_plain"] is not False]
    return max(spec, key=lambda r: r["tokens_per_second"] or 0.0, default=None)


def targets(results: list[dict]) -> list[tuple[str, float, float | None, str]]:
    """(what, required ratio, measured ratio or None, how measured)."""
    by = {r["name"]: r for r in results}
    best = best_speculative(results)
    plain, hf, hfa = by.get("plain"), by.get("hf"), by.get("hf-assisted")

    def r(a, b):
        return a["tokens_per_second"] / b["tokens_per_second"] if a and b and b["tokens_per_second"] else None

    name = best["name"] if best else "—"
    return [
        ("best speculative mode ≥ 2.0× plain decoding", 2.0, r(best, plain), f"{name} / plain"),
        ("best speculative mode ≥ 1.5× HF assisted generation", 1.5, r(best, hfa), f"{name} / hf-assisted"),
        ("plain decoding ≥ 1.0× HF generate", 1.0, r(plain, hf), "plain / hf"),
    ]


def embedded(cfg: dict) -> bool:
    """Both models are the embedded pair (a run may name only --draft: then the target alone is)."""
    words = cfg["command"].split()
    return bool(cfg.get("embedded_pair")) and "--target" not in words and "--draft" not in words


def _matches_target(cfg: dict) -> bool:
    return (cfg["kind"] == "offline" and embedded(cfg)
            and all(cfg.get(k) == v for k, v in TARGET_CONFIG.items() if k != "embedded_pair"))


def target_section(runs: list[tuple[str, dict]]) -> list[str]:
    lines = ["## Where we stand against the targets", "",
             f"The speed targets of `bench/README.md` apply to the configuration {TARGET_TEXT}; ratios of tokens/s "
             "measured within one run. One row per run of that configuration that measured at least one of the "
             "ratios; 'best' is the fastest Hedgerow speculative mode whose output equals plain decoding's.", ""]
    matching = [(stem, d) for stem, d in runs if _matches_target(d["config"])]
    assessed = [(stem, d, targets(d["results"])) for stem, d in matching]
    assessed = [(stem, d, t) for stem, d, t in assessed if any(got is not None for _, _, got, _ in t)]
    if not assessed:
        return lines + ["No run in bench/results has that configuration yet: the targets are not assessed.", ""]
    specs = assessed[0][2]
    headers = ["run", "best mode", "best / plain (≥ 2.0×)", "best / hf-assisted (≥ 1.5×)", "plain / hf (≥ 1.0×)",
               "met"]
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
        mismatched = [r["name"] for r in data["results"] if r["outputs_match_plain"] is False]
        if mismatched:
            lines += [f"`{stem}`: output differs from plain decoding for {', '.join(mismatched)} "
                      "(excluded from 'best mode').", ""]
    return lines
