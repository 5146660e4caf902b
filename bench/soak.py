"""A soak test: many concurrent streams for a set time against one server, for errors and memory growth.

    hedgerow bench soak --concurrency 64 --duration 180 --output bench/results/soak.json   # starts `hedgerow serve`
    hedgerow bench soak --grpc 127.0.0.1:50051 --server-pid PID --concurrency 64 --duration 180

Without ``--grpc`` it starts ``hedgerow serve --port 0 --metrics-port 0`` with ``--server-args`` (default:
none, the embedded pair) and stops it with SIGTERM at the end, recording its exit status. The load
(``soak_load``) mixes greedy and sampled requests, every speculation mode, and clients that cancel
or drop their connection mid-stream. Reported: requests by ending, errors, tokens/s and TTFT
percentiles after a warm-up, and the server's resident memory at launch, after the warm-up
("start") and at the end, from /proc/PID/status of the server it started or of ``--server-pid``.
Exit status 1 when a request failed, the server's memory could not be read, or a server it started
did not exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from hedgerow.bench import tables
from hedgerow.bench.common import csv, new_config, note_start, remember_parser, write_json
from hedgerow.bench.prompts import load_prompts
from hedgerow.bench.soak_load import soak
from hedgerow.server.errors import HedgerowError

MODES = ("plain", "chain", "tree")
READY = re.compile(r"hedgerow: serving \S+ on (\S+):(\d+)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--grpc", metavar="ADDR", default=None,
                   help="host:port of a running `hedgerow serve` (default: start one with --server-args)")
    g.add_argument("--server-pid", type=int, default=None, metavar="PID",
                   help="with --grpc: the server's process id, whose memory is reported (default: none)")
    g.add_argument("--server-args", default="", metavar="ARGS",
                   help="flags of the `hedgerow serve` it starts, one string (default: none: the embedded pair)")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=64, help="clients streaming at once (default: 64)")
    g.add_argument("--duration", type=float, default=180.0, help="measured seconds (default: 180)")
    g.add_argument("--warmup", type=float, default=10.0,
                   help="seconds of the same load first, not measured; the server's memory after it is the start "
                   "figure (default: 10)")
    g.add_argument("--modes", type=csv(str, "--modes"), default=list(MODES),
                   help="speculation modes, taken in turn (default: plain,chain,tree)")
    g.add_argument("--sampled-share", type=float, default=0.5, help="share of sampled requests (default: 0.5)")
    g.add_argument("--cancel-share", type=float, default=0.1,
                   help="share of requests the client cancels mid-stream (default: 0.1)")
    g.add_argument("--disconnect-share", type=float, default=0.1,
                   help="share of requests whose client drops its connection mid-stream (default: 0.1)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest request; each draws from [1/4, 1] of it "
                   "(default: 128)")
    g.add_argument("--prompts", default="humaneval", help="humaneval, mtbench or FILE.jsonl (default: humaneval)")
    g.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (default: all)")
    g.add_argument("--seed", type=int, default=0, help="the mix of requests (default: 0)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: 600)")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="write the results JSON here")
    remember_parser(p, "soak")


def check_args(args) -> None:
    if args.concurrency < 1 or args.max_new_tokens < 1:
        raise HedgerowError("--concurrency and --max-new-tokens must be >= 1")
    if not args.duration > 0 or not args.warmup >= 0:
        raise HedgerowError("--duration must be > 0 and --warmup >= 0")
    shares = (args.sampled_share, args.cancel_share, args.disconnect_share)
    if not all(0 <= s <= 1 for s in shares) or args.cancel_share + args.disconnect_share > 1:
        raise HedgerowError("--sampled-share, --cancel-share and --disconnect-share must be in [0, 1], the last two "
                            "summing to at most 1")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise HedgerowError(f"--modes: {','.join(bad)} is not plain, chain or tree")
    if args.server_pid is not None and args.grpc is None:
        raise HedgerowError("--server-pid goes with --grpc (a server the soak starts is measured anyway)")


class StartedServer:
    """``hedgerow serve`` as a child process on free ports; its stderr goes to a log file (``log``),
    whose last lines are shown if it fails to start, and which is kept if the soak finds a problem."""

    def __init__(self, server_args: str):
        self.command = [sys.executable, "-m", "hedgerow.server.cli", "serve", "--port", "0", "--metrics-port", "0",
                        *shlex.split(server_args)]
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix="hedgerow-soak-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        ready = READY.match(line)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            tail = " | ".join(self.log.read().strip().splitlines()[-3:])
            self.log.close()
            self.discard_log()
            raise HedgerowError(f"`hedgerow serve {server_args}` did not start: {tail or line.strip()}")
        self.address = f"{ready[1]}:{ready[2]}"
        self.pid = self.proc.pid
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # never let its stdout fill

    def stop(self) -> int:
        """SIGTERM (a drain), and its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def discard_log(self) -> None:
        Path(self.log.name).unlink(missing_ok=True)


def run(args) -> int:
    note_start(args)
    check_args(args)
    prompts = load_prompts(args.prompts, args.num_prompts)
    started = StartedServer(args.server_args) if args.grpc is None else None
    address = args.grpc or started.address
    pid = started.pid if started else args.server_pid
    try:
        results = asyncio.run(soak(address, pid, prompts, args))
    finally:
        exit_status = started.stop() if started else None
    results["server_exit_status"] = exit_status
    data = {
        "config": new_config(
            "soak", args, address=address, server_command=shlex.join(["hedgerow", *started.command[3:]])
            if started else None, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup,
            modes=args.modes, sampled_share=args.sampled_share, cancel_share=args.cancel_share,
            disconnect_share=args.disconnect_share, max_new_tokens=args.max_new_tokens, prompts=args.prompts,
            num_prompts=len(prompts)),
        "results": results,
    }
    write_json(args.output, data)
    print(tables.soak(results))
    problems = []
    if results["errors"]:
        problems.append(f"{results['errors']} request(s) failed: {'; '.join(results['error_samples'])}")
    if results["server_rss_mib"]["end"] is None:
        problems.append("the server's memory could not be read (give --server-pid with --grpc)")
    if exit_status not in (None, 0):
        problems.append(f"the server exited with status {exit_status}")
    for problem in problems:
        print(f"hedgerow: soak: {problem}", file=sys.stderr)
    if started and problems:
        print(f"hedgerow: soak: the server's log is {started.log.name}", file=sys.stderr)
    elif started:
        started.discard_log()
    return 1 if problems else 0
