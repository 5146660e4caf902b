"""The targets of ``hedgerow bench serve``: one server or several in one run, each measured at the
same concurrencies and speculation modes, the first the reference of the others.

    hedgerow bench serve --grpc single=127.0.0.1:50051 --grpc ray-2=127.0.0.1:50052 --concurrency 1,4,16,64
    hedgerow bench serve --start \\
        --grpc single=127.0.0.1:50051 --server-command "hedgerow serve --port 50051" \\
        --grpc ray-2=127.0.0.1:50052 --server-command "hedgerow serve --ray --replicas 2 --port 50052 --http-port 8052"

A target is ``[NAME=]ADDR`` (``--grpc``) or ``[NAME=]URL`` (``--openai``); its name defaults to the
address. ``--server-command``, once per target and in the same order, records the command that
started each server; with ``--start`` the benchmark runs each command itself, waits until the
server answers, measures it, and stops it with SIGTERM before it starts the next: one server on
the machine at a time, so the targets never compete for its cores. Targets are measured one after
the other, not interleaved as the modes are; each records the machine's load averages before it
started and after it was measured, so a drift between them shows.

Every results entry names its target (``target``); an entry of a target after the first carries
``vs_reference``, its throughput and latency against the first target's at the same concurrency
and mode (the ratios of ``serve_stats.vs_plain``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hedgerow.bench.serve_clients import error_text
from hedgerow.bench.serve_stats import vs_plain
from hedgerow.server.errors import HedgerowError

_NAMED = re.compile(r"^([A-Za-z][\w.+-]*)=(.+)$")


@dataclass(frozen=True)
class Target:
    name: str
    client: str  # grpc or openai
    address: str
    command: str | None = None  # the command that starts it (recorded; run with --start)


def parse_targets(args) -> list[Target]:
    """The targets of ``--grpc``/``--openai`` (lists: the flags repeat) with their ``--server-command``."""
    client, values = ("grpc", args.grpc) if args.grpc else ("openai", args.openai)
    targets = []
    for value in values:
        named = _NAMED.match(value)
        name, address = (named[1], named[2]) if named else (value, value)
        targets.append(Target(name, client, address))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise HedgerowError(f"--{client}: two targets are named alike ({', '.join(names)}): name them NAME=ADDR")
    commands = args.server_command or []
    if commands and len(commands) != len(targets):
        raise HedgerowError(f"--server-command: {len(commands)} given for {len(targets)} target(s): give one per "
                            "target, in the same order")
    if args.start and not commands:
        raise HedgerowError("--start runs each target's --server-command: give one per target")
    return [Target(t.name, t.client, t.address, c) for t, c in zip(targets, commands or [None] * len(targets))]


def load_averages() -> list[float] | None:
    """1, 5 and 15-minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


class StartedTarget:
    """A target's ``--server-command`` as a child process in its own session; its output goes to a
    log file, whose last lines are shown if it does not come up."""

    def __init__(self, target: Target):
        words = shlex.split(target.command)
        if words and words[0] == "hedgerow":  # this interpreter's hedgerow, as the benchmark's own
            words = [sys.executable, "-m", "hedgerow.server.cli", *words[1:]]
        self.command = target.command
        self.log = tempfile.NamedTemporaryFile(mode="w+", prefix=f"hedgerow-bench-{target.name}-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(words, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(self) -> str:
        return " | ".join(Path(self.log.name).read_text(errors="replace").strip().splitlines()[-3:])

    async def wait_ready(self, client, timeout: float) -> dict:
        """Poll ``info()`` until the server answers; its answer (the server's model info)."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise HedgerowError(f"`{self.command}` exited with status {self.proc.returncode}: {self.tail()}")
            try:
                info = await client.info()
                if not (isinstance(info, dict) and "error" in info):
                    return info
                last = info["error"]
            except Exception as exc:
                last = error_text(exc)
            if time.monotonic() > deadline:
                raise HedgerowError(f"`{self.command}` did not answer within {timeout:g} s ({last}): {self.tail()}")
            await asyncio.sleep(1.0)

    def stop(self) -> int:
        """SIGTERM (a drain; ``hedgerow serve --ray`` also stops the cluster it started), then the
        whole session killed if it has not exited within two minutes; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def discard_log(self) -> None:
        Path(self.log.name).unlink(missing_ok=True)


def against_reference(results: list[dict]) -> None:
    """Set ``vs_reference`` on every entry: None for the first target's, else the ratios to the
    first target's entry of the same concurrency and mode."""
    if not results:
        return
    reference = results[0]["target"]
    by = {(r["concurrency"], r["speculation"]): r for r in results if r["target"] == reference}
    for r in results:
        ref = by.get((r["concurrency"], r["speculation"]))
        r["vs_reference"] = None if r["target"] == reference or ref is None else vs_plain(r, ref)
