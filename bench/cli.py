"""benchmarks: offline speedup, latency under load, oracle-acceptance sweeps, the GPU check, the results report

    hedgerow bench offline [--target T --draft D] --prompts humaneval --num-prompts 10 --max-new-tokens 128 \\
        --modes plain,chain,tree --baselines hf,hf-assisted --output bench/results/offline.json
    hedgerow bench serve --grpc 127.0.0.1:50051 --concurrency 1,4,16,64 --duration 30
    hedgerow bench sweep --oracle-acceptance 0.5,0.7,0.9
    hedgerow bench gpu --output bench/results/gpu.json   # on a GPU machine: correctness and speed in < 8 min
    hedgerow bench drafts --drafts DIR,DIR --compile on   # cost per draft token against acceptance, per draft
    hedgerow bench soak --concurrency 64 --duration 180  # errors and server memory under a long mixed load
    hedgerow bench report            # bench/RESULTS.md from bench/results/*.json, plots into bench/out/plots

Every figure is a ratio measured in one run: same machine, same models, same prompts.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "offline": ("hedgerow.bench.offline", "speedup of Hedgerow's modes against plain decoding and transformers (batch 1)"),
    "serve": ("hedgerow.bench.serve", "TTFT, inter-token and end-to-end latency of a running server under load"),
    "sweep": ("hedgerow.bench.sweep", "systems benchmark: oracle drafter at set acceptance rates, against the ideal speedup"),
    "gpu": ("hedgerow.bench.gpu", "one-command GPU check: kernel, CUDA graphs, greedy equality, 8B/1B sweep, timings"),
    "drafts": ("hedgerow.bench.drafts", "drafts of different shapes against one target: cost per token against acceptance"),
    "soak": ("hedgerow.bench.soak", "many concurrent streams for a set time: errors, tokens/s, TTFT, server memory"),
    "report": ("hedgerow.bench.results", "regenerate bench/RESULTS.md from bench/results/*.json and draw its plots"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{offline,serve,sweep,gpu,drafts,soak,report}",
                           parser_class=type(p))
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(bench_module=module)


def run(args) -> int:
    return importlib.import_module(args.bench_module).run(args)
