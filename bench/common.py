"""Pieces every benchmark shares: the machine it ran on, the command line that reproduces a run,
acceptance summaries, and writing the JSON evidence.

Every benchmark JSON has the same top level: ``config`` (with ``kind``: offline, serve, sweep, gpu or soak;
``schema_version``; ``command``: the ``hedgerow bench ...`` line that reproduces it; ``machine``) and
``results``. Schema version 2 uses the names of docs/glossary.md; version 1 files are read through
``bench/results.py``'s ``current_names``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SCHEMA_VERSION = 2


def machine_info() -> dict:
    """CPU model, cores and library versions, read where the run happens (never at report time)."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(terse=True),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def remember_parser(p: argparse.ArgumentParser, command: str) -> None:
    """Let ``command_line`` rebuild the command from parsed arguments (tests call ``run`` directly,
    so ``sys.argv`` is not the command)."""
    p.set_defaults(_bench_parser=p, _bench_command=command)


def note_start(args: argparse.Namespace) -> None:
    """Remember the machine's load when the benchmark starts (the JSON records it beside the load at
    the end: a load well above the benchmark's own threads means something else was running)."""
    args._load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    args._started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")


def command_line(args: argparse.Namespace) -> str:
    """``hedgerow bench <sub> ...`` with every option that differs from its default."""
    parser: argparse.ArgumentParser = args._bench_parser
    words = ["hedgerow", "bench", args._bench_command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        elif isinstance(action, argparse._AppendAction):  # a repeated flag: once per value
            for v in value:
                words += [flag, str(v)]
        elif isinstance(value, (list, tuple)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def csv(kind, name: str):
    """An argparse type: a comma-separated list of ``kind``."""

    def parse(text: str):
        try:
            items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a comma-separated list") from None
        if not items:
            raise argparse.ArgumentTypeError(f"{name}: empty list")
        return items

    return parse


# --- acceptance ---------------------------------------------------------------------------------
def acceptance_summary(stats: Iterable) -> dict:
    """Sum ``SeqStats`` of many sequences: acceptance rate (accepted draft tokens / drafted tokens),
    mean accepted length (emitted tokens per verify step, the target's own token included) and its
    histogram."""
    hist: Counter = Counter()
    drafted = accepted = steps = 0
    for s in stats:
        hist.update(s.emitted_per_step)
        drafted += s.draft_tokens
        accepted += s.accepted_tokens
        steps += s.verify_steps
    n = sum(hist.values())
    return {
        "verify_steps": steps,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": sum(k * v for k, v in hist.items()) / n if n else None,
        "acceptance_length_histogram": {str(k): hist[k] for k in sorted(hist)},
    }


# --- output -------------------------------------------------------------------------------------
def new_config(kind: str, args: argparse.Namespace, **fields) -> dict:
    machine = machine_info()
    machine["load_average_1min_at_start"] = getattr(args, "_load_at_start", None)
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "command": command_line(args),
        "machine": machine,
        # when note_start ran (the benchmark's start); the config itself is written at its end
        "started": getattr(args, "_started_at", None) or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fields,
    }


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def speculative_histograms(results: list[dict]) -> list[dict]:
    """The results of speculative contenders that carry an acceptance-length histogram (the RESULTS.md
    table and the plot of acceptance lengths show these)."""
    return [r for r in results if r.get("acceptance_length_histogram") and r["name"] != "plain"]
