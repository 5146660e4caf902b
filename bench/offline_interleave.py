"""The interleaved runs of ``hedgerow bench offline``, and each contender's entry of the results JSON.

After a warm-up, contenders run interleaved: prompt by prompt, each prompt through every contender
(the order rotating from prompt to prompt), so drift on the machine hits all alike.
``tokens_per_second`` is generated tokens over wall time summed over every prompt and repeat.
Acceptance fields are null for the transformers baselines (assisted generation does not expose
them reliably). Each contender is compared with plain decoding of its own model implementation
(speed and, greedy, tokens) when that ran, else with the first plain contender.
"""

from __future__ import annotations

import sys

from hedgerow.bench.common import acceptance_summary, ratio
from hedgerow.bench.offline_contenders import Contender, Run, Runner


def warm_up(runner: Runner, contenders: list[Contender], prompt_ids: list[list[int]], warmup: int, seed: int) -> None:
    """The first ``warmup`` prompts through every contender, untimed."""
    from tqdm import tqdm

    for i in tqdm(range(min(warmup, len(prompt_ids))), desc="warm-up", file=sys.stderr, leave=False):
        for c in contenders:
            runner.run(c, prompt_ids[i], seed + i)


def run_interleaved(runner: Runner, contenders: list[Contender], prompt_ids: list[list[int]], repeats: int,
                    seed: int) -> dict[str, list[Run]]:
    """Every contender's runs, in prompt order, repeat after repeat; prompt i of repeat r has seed
    ``seed + r * n + i``."""
    from tqdm import tqdm

    n = len(prompt_ids)
    runs: dict[str, list[tuple[int, Run]]] = {c.name: [] for c in contenders}  # (r * n + i, run)
    bar = tqdm(total=repeats * n * len(contenders), desc="offline", file=sys.stderr, unit="gen")
    for r in range(repeats):
        for i, ids in enumerate(prompt_ids):
            k = r * n + i
            for j in range(len(contenders)):
                c = contenders[(k + j) % len(contenders)]  # rotate who goes first
                runs[c.name].append((k, runner.run(c, ids, seed + k)))
                bar.update()
    bar.close()
    return {name: [run for _, run in sorted(items, key=lambda x: x[0])] for name, items in runs.items()}


def is_plain(c: Contender) -> bool:
    return c.kind == "engine" and c.spec.mode.value == "plain"


def results(contenders: list[Contender], runs: dict[str, list[Run]], repeats: int, n: int, greedy: bool,
            engine_info: dict[str, dict]) -> list[dict]:
    """One entry per contender, with ``engine_info[name]`` (its implementation and fast-path
    settings) and its speedup over plain decoding of its implementation when that ran."""
    plains = [c for c in contenders if is_plain(c)]
    by_impl: dict[str, Contender] = {}
    for c in plains:
        by_impl.setdefault(engine_info[c.name]["implementation"], c)
    out = []
    for c in contenders:
        plain = by_impl.get(engine_info[c.name]["implementation"], plains[0] if plains else None)
        res = summarize(c, runs, repeats, n, greedy, runs[plain.name] if plain else None)
        res.update(engine_info[c.name], plain_reference=plain.name if plain else None)
        out.append(res)
    tps = {r["name"]: r["tokens_per_second"] for r in out}
    for res in out:
        res["speedup_vs_plain"] = ratio(res["tokens_per_second"], tps.get(res["plain_reference"]))
    return out


def summarize(c: Contender, runs: dict[str, list[Run]], repeats: int, n: int, greedy: bool,
              plain: list[Run] | None) -> dict:
    mine = runs[c.name]
    tokens = sum(len(r.tokens) for r in mine)
    wall = sum(r.seconds for r in mine)
    by_repeat = []
    for rep in range(repeats):
        part = mine[rep * n:(rep + 1) * n]
        secs = sum(r.seconds for r in part)
        by_repeat.append(sum(len(r.tokens) for r in part) / secs if secs else None)
    match = all(a.tokens == b.tokens for a, b in zip(mine, plain)) if greedy and plain is not None else None
    res = {
        "name": c.name,
        "kind": c.kind,
        "tokens_per_second": tokens / wall if wall else None,
        "speedup_vs_plain": None,
        "mean_accepted_length": None,
        "acceptance_rate": None,
        "acceptance_length_histogram": None,
        "outputs_match_plain": match,
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second_by_repeat": by_repeat,
        "seconds_per_generation": [round(r.seconds, 4) for r in mine],  # prompt by prompt, repeat by repeat
    }
    if c.kind == "engine":
        acc = acceptance_summary(r.stats for r in mine)
        res.update({k: acc[k] for k in ("mean_accepted_length", "acceptance_rate", "acceptance_length_histogram",
                                        "verify_steps", "draft_tokens", "accepted_tokens")})
        # with an adaptive draft-size policy the engine picks the draft budget per step
        res["mean_draft_tokens_per_step"] = acc["draft_tokens"] / acc["verify_steps"] if acc["verify_steps"] else None
        # drafted tokens thrown away (rejected drafts and hedge branches that missed), and the branches
        for key in ("rollback_tokens", "branches", "branch_hits"):
            res[key] = sum(getattr(r.stats, key) for r in mine)
        counts: dict = {}  # per proposer (docs/glossary.md): draft and accepted tokens, summed
        for r in mine:
            for name, pc in r.stats.proposers.items():
                counts[name] = counts[name] + pc if name in counts else pc
        res["proposers"] = {name: pc.as_dict() for name, pc in sorted(counts.items())}
        phases: dict[str, float] = {}
        for r in mine:
            for k, v in r.phases.items():
                phases[k] = phases.get(k, 0.0) + v
        res["phase_seconds"] = phases  # engine.times.phases summed over this contender's runs
    return res
