"""RESULTS.md's first sections: where the offline runs stand against the targets of bench/README.md,
the speed targets of the embedded pair on the CPU, then those of the native fast path against
transformers (any offline run that measured both model implementations)."""

from __future__ import annotations

from dataclasses import dataclass

from hedgerow.bench.tables import markdown_table

# The configuration the speed targets of bench/README.md apply to.
TARGET_CONFIG = {"prompts": "humaneval", "num_prompts": 10, "max_new_tokens": 128, "greedy": True,
                 "target_device": "cpu", "embedded_pair": True}
TARGET_TEXT = "embedded pair, CPU, greedy, the first 10 HumanEval prompts, 128 new tokens"


@dataclass(frozen=True)
class Target:
    what: str
    need: float
    got: float | None  # the measured ratio, None when the run did not measure it
    at_most: bool = False  # met when got <= need (a ratio of times); else when got >= need (of speeds)

    @property
    def met(self) -> bool:
        return self.got is not None and (self.got <= self.need if self.at_most else self.got >= self.need)


def best_speculative(results: list[dict]) -> dict | None:
    """The fastest Hedgerow speculative mode among those whose output was checked equal to plain
    decoding's (greedy) or not checkable (sampling)."""
    spec = [r for r in results
            if r["kind"] == "engine" and r["name"] != "plain" and r["outputs_match_plain"] is not False]
    return max(spec, key=lambda r: r["tokens_per_second"] or 0.0, default=None)


def _speed(a: dict | None, b: dict | None) -> float | None:
    return a["tokens_per_second"] / b["tokens_per_second"] if a and b and b["tokens_per_second"] else None


def targets(results: list[dict]) -> list[Target]:
    by = {r["name"]: r for r in results}
    best = best_speculative(results)
    plain, hf, hfa = by.get("plain"), by.get("hf"), by.get("hf-assisted")
    return [
        Target("best speculative mode ≥ 2.0× plain decoding", 2.0, _speed(best, plain)),
        Target("best speculative mode ≥ 1.5× HF assisted generation", 1.5, _speed(best, hfa)),
        Target("plain decoding ≥ 1.0× HF generate", 1.0, _speed(plain, hf)),
    ]


def embedded(cfg: dict) -> bool:
    """Both models are the embedded pair (a run may name only --draft: then the target alone is)."""
    words = cfg["command"].split()
    return bool(cfg.get("embedded_pair")) and "--target" not in words and "--draft" not in words


def _matches_target(cfg: dict) -> bool:
    return (cfg["kind"] == "offline" and embedded(cfg)
            and all(cfg.get(k) == v for k, v in TARGET_CONFIG.items() if k != "embedded_pair"))


def _assessment(headers: list[str], assessed: list[tuple[str, list, list[Target]]]) -> list[str]:
    """The table (one row per run: its leading cells, each target's ratio and verdict, how many
    met), then each target's verdict over all runs with its best figure."""
    rows, best = [], [None] * len(assessed[0][2])
    for stem, lead, ts in assessed:
        cells = []
        for i, t in enumerate(ts):
            cells.append("—" if t.got is None else f"{t.got:.2f}× ({'met' if t.met else 'not met'})")
            if t.got is not None and (best[i] is None or (t.got < best[i][0] if t.at_most else t.got > best[i][0])):
                best[i] = (t.got, stem, t.met)
        measured = sum(t.got is not None for t in ts)
        rows.append([f"`{stem}`", *lead, *cells, f"{sum(t.met for t in ts)} of {measured} measured"])
    lines = [markdown_table(headers, rows), ""]
    for t, b in zip(assessed[0][2], best):
        if b is None:
            lines.append(f"- {t.what}: not measured.")
        else:
            lines.append(f"- {t.what}: {'met' if b[2] else 'not met'}; best measured {b[0]:.2f}× (`{b[1]}`).")
    return lines + [""]


def target_section(runs: list[tuple[str, dict]]) -> list[str]:
    lines = ["## Where we stand against the targets", "",
             f"The speed targets of `bench/README.md` apply to the configuration {TARGET_TEXT}; ratios of tokens/s "
             "measured within one run. One row per run of that configuration that measured at least one of the "
             "ratios; 'best' is the fastest Hedgerow speculative mode whose output equals plain decoding's.", ""]
    matching = [(stem, d) for stem, d in runs if _matches_target(d["config"])]
    assessed = [(stem, d, targets(d["results"])) for stem, d in matching]
    assessed = [(stem, d, t) for stem, d, t in assessed if any(x.got is not None for x in t)]
    if not assessed:
        return lines + ["No run in bench/results has that configuration yet: the targets are not assessed.", ""]
    headers = ["run", "best mode", "best / plain (≥ 2.0×)", "best / hf-assisted (≥ 1.5×)", "plain / hf (≥ 1.0×)",
               "met"]
    rows = []
    for stem, data, ts in assessed:
        mode = best_speculative(data["results"])
        rows.append((stem, [mode["name"] if mode else "—"], ts))
    lines += _assessment(headers, rows)
    for stem, data, _ in assessed:
        mismatched = [r["name"] for r in data["results"] if r["outputs_match_plain"] is False]
        if mismatched:
            lines += [f"`{stem}`: output differs from plain decoding for {', '.join(mismatched)} "
                      "(excluded from 'best mode').", ""]
    return lines


# --- the native fast path against transformers ---------------------------------------------------
def _both_implementations(data: dict) -> bool:
    return data["config"]["kind"] == "offline" and {"native", "transformers"} <= {
        r.get("implementation") for r in data["results"] if r["kind"] == "engine"}


def native_targets(data: dict) -> tuple[dict | None, list[Target]]:
    """The best native speculative mode, and the targets of the native fast path in one run."""
    specs = {c["name"]: c["spec"] for c in data["config"]["contenders"] if c["spec"]}
    native = [r for r in data["results"] if r["kind"] == "engine" and r.get("implementation") == "native"]

    def fastest(pick) -> dict | None:
        return max((r for r in native if pick(specs[r["name"]]) and r["outputs_match_plain"] is not False),
                   key=lambda r: r["tokens_per_second"] or 0.0, default=None)

    plain = fastest(lambda s: s["mode"] == "plain")
    best = fastest(lambda s: s["mode"] != "plain")
    chain = fastest(lambda s: s["mode"] == "chain")
    tree = fastest(lambda s: s["mode"] == "tree" and not s["tree_static"])
    by = {r["name"]: r for r in data["results"]}
    times = data.get("pass_times") or {}
    draft = [times.get(impl, {}).get("t_draft") for impl in ("native", "transformers")]
    return best, [
        Target("native draft cost per token ≤ 0.5× transformers'", 0.5,
               draft[0] / draft[1] if all(draft) else None, at_most=True),
        Target("plain decoding (native) ≥ 1.3× HF generate", 1.3, _speed(plain, by.get("hf"))),
        Target("best speculative mode (native) ≥ 2.0× plain decoding (native)", 2.0, _speed(best, plain)),
        Target("best speculative mode (native) ≥ 1.5× HF assisted generation", 1.5,
               _speed(best, by.get("hf-assisted"))),
        Target("dynamic tree (native) ≥ 1.0× chain (native)", 1.0, _speed(tree, chain)),
    ]


def native_section(runs: list[tuple[str, dict]]) -> list[str]:
    lines = ["## The native fast path against transformers", "",
             "The targets of `bench/README.md` for Hedgerow's native models, in every offline run that measured both "
             "model implementations (modes `MODE:native` and `MODE:transformers`); ratios measured within one run. "
             "'best' is the fastest native speculative mode whose output equals plain decoding's; the draft cost per token "
             "ratio is of the median pass times (`pass_times`); tree / chain compares the fastest native dynamic "
             "tree with the fastest native chain.", ""]
    assessed = [(stem, d, native_targets(d)) for stem, d in runs if _both_implementations(d)]
    if not assessed:
        return lines + ["No run in bench/results measured both implementations yet: these targets are not "
                        "assessed.", ""]
    headers = ["run", "device", "best mode", "native draft per token / transformers' (≤ 0.5×)", "plain / hf (≥ 1.3×)",
               "best / plain (≥ 2.0×)", "best / hf-assisted (≥ 1.5×)", "tree / chain (≥ 1.0×)", "met"]
    lines += _assessment(headers, [(stem, [d["config"]["target_device"], best["name"] if best else "—"], ts)
                                   for stem, d, (best, ts) in assessed])
    for stem, data, (best, _) in assessed:
        lines += bound_lines(stem, data, best)
    return lines


def bound_lines(stem: str, data: dict, best: dict | None) -> list[str]:
    """What bounds the best chain of a run, from its own pass times: a chain step of γ draft tokens
    costs γ draft passes and one verify pass of γ+1 tokens, so with E tokens per step the speedup
    over plain decoding is at most E / (γ·c + v), c = draft cost per token / target pass, v = verify pass /
    target pass (docs/algorithms.md, the expected-speedup model); 2.0× needs c ≤ (E/2 − v) / γ."""
    times = (data.get("pass_times") or {}).get("native")
    specs = {c["name"]: c["spec"] for c in data["config"]["contenders"] if c["spec"]}
    if not times or best is None or specs[best["name"]]["mode"] != "chain" or not times.get("t_verify"):
        return []
    gamma = specs[best["name"]]["draft_tokens"]
    e = best["mean_accepted_length"]
    c, v = times["t_draft"] / times["t_target"], times["t_verify"] / times["t_target"]
    bound = e / (gamma * c + v)
    need = (e / 2 - v) / gamma
    why = (f"even a free draft gives at most E / v = {e / v:.2f}×" if need <= 0
           else f"2.0× needs c ≤ {need:.2f} at this acceptance")
    return [f"`{stem}`, what bounds {best['name']}: E = {e:.2f} tokens per step, c = {c:.2f}, v = {v:.2f} "
            f"(a verify pass of {times.get('verify_tokens', gamma + 1)} tokens against a target pass of one), so at "
            f"most E / (γ·c + v) = {bound:.2f}× over plain decoding (measured {best['tokens_per_second'] / _plain_tps(data):.2f}×); "
            f"{why}.", ""]


def _plain_tps(data: dict) -> float:
    return next(r["tokens_per_second"] for r in data["results"] if r["name"] == "plain")
