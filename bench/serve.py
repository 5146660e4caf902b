"""Latency under load: a running server, driven at several concurrencies, speculative and plain decoding.

    hedgerow bench serve --grpc 127.0.0.1:50051 --concurrency 1,4,16,64 --duration 30
    hedgerow bench serve --openai http://127.0.0.1:8000 --concurrency 1,4 --requests 64
    hedgerow bench serve --grpc single=127.0.0.1:50051 --grpc ray-2=127.0.0.1:50052 --duration 20

Reported per concurrency and speculation mode (``--spec-modes``, default ``plain,chain``): TTFT,
inter-token and end-to-end latency percentiles, output tokens/s and requests/s, and, for each
speculative mode, its ratio to ``plain`` at the same concurrency. Several servers (targets) can be
measured in one run, each at the same levels, against the first (``serve_targets``; ``--start``
starts and stops each in turn). The clients are in ``serve_clients``, the load generator in
``serve_load``, the statistics in ``serve_stats``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from hedgerow.bench import tables
from hedgerow.bench.common import csv, new_config, note_start, remember_parser, write_json
from hedgerow.bench.plots import command_plots
from hedgerow.bench.prompts import load_prompts
from hedgerow.bench.serve_load import measure
from hedgerow.bench.serve_targets import StartedTarget, against_reference, load_averages, parse_targets
from hedgerow.server.errors import HedgerowError

SPEC_MODES = ("plain", "chain", "tree")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server").add_mutually_exclusive_group(required=True)
    g.add_argument("--grpc", metavar="[NAME=]ADDR", action="append",
                   help="host:port of a `hedgerow serve` gRPC server; repeat for several targets, the first the "
                   "reference of the others")
    g.add_argument("--openai", metavar="[NAME=]URL", action="append",
                   help="base URL of an OpenAI-compatible server (…/v1/completions); repeat for several targets")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=csv(int, "--concurrency"), default=[1, 4, 16, 64],
                   help="clients in flight, a list (default: 1,4,16,64)")
    g.add_argument("--duration", type=float, default=None, help="seconds per concurrency and mode (default: 30)")
    g.add_argument("--requests", type=int, default=None, help="requests per concurrency and mode, instead of --duration")
    g.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second (default: closed loop)")
    g.add_argument("--spec-modes", type=csv(str, "--spec-modes"), default=["plain", "chain"],
                   help="speculation modes to compare, plain first (default: plain,chain)")
    g.add_argument("--repeats", type=int, default=1, help="alternating rounds of the modes (default: 1)")
    g.add_argument("--warmup", type=int, default=2, help="untimed requests per mode first (default: 2)")
    g = p.add_argument_group("requests")
    g.add_argument("--prompts", default="humaneval", help="humaneval, mtbench or FILE.jsonl (default: humaneval)")
    g.add_argument("--num-prompts", type=int, default=None, help="the first N prompts, cycled (default: all)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="per request (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--ignore-eos", action="store_true", help="every request generates --max-new-tokens tokens")
    g.add_argument("--model", default="hedgerow", help="`model` field of OpenAI requests (default: hedgerow)")
    g.add_argument("--seed", type=int, default=0, help="arrival times under --rate (default: 0)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    g = p.add_argument_group("output")
    g.add_argument("--server-command", action="append", default=None,
                   help="the command line that starts the server, recorded in the JSON for the report; once per "
                   "target, in their order")
    g.add_argument("--start", action="store_true",
                   help="start each target's --server-command before measuring it and stop it (SIGTERM) after: one "
                   "server at a time")
    g.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds a started server may take to answer (default: 600)")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    remember_parser(p, "serve")


def check_args(args) -> None:
    """Refuse bad flags before any request; without --duration or --requests, 30 s per level."""
    if args.duration is None and args.requests is None:
        args.duration = 30.0
    elif args.duration is not None and args.requests is not None:
        raise HedgerowError("give --duration or --requests, not both")
    if args.duration is not None and not args.duration > 0:
        raise HedgerowError(f"--duration must be > 0, got {args.duration}")
    if args.requests is not None and args.requests < 1:
        raise HedgerowError(f"--requests must be >= 1, got {args.requests}")
    if args.rate is not None and not args.rate > 0:
        raise HedgerowError(f"--rate must be > 0, got {args.rate}")
    if any(c < 1 for c in args.concurrency):
        raise HedgerowError(f"--concurrency values must be >= 1, got {args.concurrency}")
    bad = [m for m in args.spec_modes if m not in SPEC_MODES]
    if bad or len(set(args.spec_modes)) != len(args.spec_modes):
        raise HedgerowError(f"--spec-modes: {','.join(args.spec_modes)} is not a list of distinct plain, chain, tree")
    if not args.start_timeout > 0:
        raise HedgerowError(f"--start-timeout must be > 0, got {args.start_timeout}")
    if args.repeats < 1 or args.warmup < 0 or args.max_new_tokens < 1:
        raise HedgerowError("--repeats and --max-new-tokens must be >= 1, --warmup >= 0")


def run(args) -> int:
    note_start(args)
    check_args(args)
    targets = parse_targets(args)
    prompts = load_prompts(args.prompts, args.num_prompts)
    measured, results = [], []
    for target in targets:
        entry = {"name": target.name, "client": target.client, "address": target.address,
                 "server_command": target.command, "started": bool(args.start),
                 "load_average_before": load_averages()}
        started = StartedTarget(target) if args.start else None
        try:
            out = asyncio.run(measure(args, prompts, target, started))
        except BaseException:
            if started is not None:
                started.stop()
                print(f"hedgerow: the log of `{target.command}` is {started.log.name}", file=sys.stderr)
            raise
        entry["load_average_after"] = load_averages()
        if started is not None:
            entry["server_exit_status"] = started.stop()
            started.discard_log()
        entry["server"] = out["server"]
        measured.append(entry)
        results += out["results"]
    against_reference(results)
    first = measured[0]
    data = {
        "config": new_config(
            "serve", args, client=first["client"], address=first["address"], server=first["server"],
            server_command=first["server_command"], targets=measured, concurrency=args.concurrency,
            duration=args.duration, requests=args.requests, rate=args.rate, spec_modes=args.spec_modes,
            repeats=args.repeats, prompts=args.prompts, num_prompts=len(prompts),
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
        ),
        "results": results,
    }
    write_json(args.output, data)
    print(tables.serve(results))
    if len(targets) > 1:
        print()
        print(tables.serve_reference(results))
    command_plots(args, data)
    failed = sum(r["failed"] for r in results)
    if failed:
        print(f"hedgerow: warning: {failed} request(s) failed", file=sys.stderr)
    return 0
