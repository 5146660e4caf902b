"""The load of ``hedgerow bench soak``: N clients streaming for a set time, and what came of it.

Each client sends one ``GenerateStream`` after the other. Its requests are drawn from a seeded mix
(``Plan``): the speculation mode (``--modes``, in turn), greedy or sampled (``--sampled-share``), a
length up to ``--max-new-tokens``, and how the client ends it: it reads it to the end, cancels it
after a message or three (``--cancel-share``), or drops its connection then (``--disconnect-share``:
the request had a channel of its own, closed mid-stream). An error is a request that failed
otherwise: a status other than the cancellation the client caused, or a stream that ended without
a finish reason.

The server's resident memory is sampled from /proc every few seconds. Its figure at the start of
the measured window is the median of the samples in the window's first ``MEMORY_WINDOW`` seconds
(at most a third of it), and at the end the median of its last ones: an allocator that keeps freed
memory for a while and hands it back later moves single samples by several percent (glibc's per-
thread arenas do), which says nothing of a leak, while a leak moves the medians.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from hedgerow.bench.serve_stats import latency_summary

ENDINGS = ("complete", "cancel", "disconnect")
REQUEST_ID = re.compile(r"\b[0-9a-f]{32}\b")
RSS_EVERY = 5.0  # seconds between memory samples (less in short runs)
MEMORY_WINDOW = 30.0  # seconds at each end of the measured window whose samples give its memory figures


@dataclass(frozen=True)
class Plan:
    prompt: str
    mode: str
    sampled: bool
    max_new_tokens: int
    ending: str  # one of ENDINGS
    after: int  # messages read before a cancel or a disconnect
    seed: int


@dataclass
class Outcome:
    plan: Plan
    sent: float  # perf_counter
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


def plan(rng: random.Random, prompts: list[str], n: int, args) -> Plan:
    """The ``n``-th request of one client."""
    roll = rng.random()
    ending = ("cancel" if roll < args.cancel_share else
              "disconnect" if roll < args.cancel_share + args.disconnect_share else "complete")
    return Plan(prompt=rng.choice(prompts), mode=args.modes[n % len(args.modes)],
                sampled=rng.random() < args.sampled_share,
                max_new_tokens=rng.randint(max(1, args.max_new_tokens // 4), args.max_new_tokens),
                ending=ending, after=rng.randint(1, 3), seed=rng.randrange(2**31))


def rss_mib(pid: int | None) -> float | None:
    """The resident memory of process ``pid`` in MiB, from /proc/PID/status (None: no such process)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class SoakClient:
    def __init__(self, address: str, timeout: float):
        import grpc

        from hedgerow.server.rpc import generation_pb2 as pb
        from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc

        self.grpc, self.pb, self.pb_grpc = grpc, pb, pb_grpc
        self.address, self.timeout = address, timeout
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.modes = {"plain": pb.SPECULATION_MODE_PLAIN, "chain": pb.SPECULATION_MODE_CHAIN,
                      "tree": pb.SPECULATION_MODE_TREE}

    def message(self, p: Plan):
        pb = self.pb
        sampling = pb.SamplingParams(temperature=0.8, top_p=0.95, seed=p.seed) if p.sampled else pb.SamplingParams()
        return pb.GenerateRequest(prompt=p.prompt, sampling=sampling,
                                  stopping=pb.StoppingCriteria(max_new_tokens=p.max_new_tokens),
                                  speculation=pb.SpeculationParams(mode=self.modes[p.mode]))

    async def run(self, p: Plan) -> Outcome:
        own = self.grpc.aio.insecure_channel(self.address) if p.ending == "disconnect" else None
        stub = self.pb_grpc.GenerationStub(own) if own is not None else self.stub
        out = Outcome(p, time.perf_counter())
        call = stub.GenerateStream(self.message(p), timeout=self.timeout)
        read, finished = 0, False
        try:
            async for part in call:
                if part.token_ids and out.ttft is None:
                    out.ttft = time.perf_counter() - out.sent
                out.tokens += len(part.token_ids)
                finished = part.finish_reason != self.pb.FINISH_REASON_UNSPECIFIED
                read += 1
                if p.ending != "complete" and read >= p.after and not finished:
                    if own is not None:
                        await own.close()  # the connection goes, the call with it
                        own = None
                    else:
                        call.cancel()
                    return out
            if not finished:
                out.error = "the stream ended without a finish reason"
        except self.grpc.aio.AioRpcError as exc:
            details = REQUEST_ID.sub("<id>", (exc.details() or "").split("\n")[0])  # alike errors read alike
            out.error = f"{exc.code().name}: {details}"
        finally:
            if own is not None:
                await own.close()
        return out

    async def close(self) -> None:
        await self.channel.close()


async def soak(address: str, pid: int | None, prompts: list[str], args) -> dict:
    """Run the load for ``args.warmup`` + ``args.duration`` seconds; the summary ``results`` of the JSON."""
    client = SoakClient(address, args.timeout)
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    measured = start + args.warmup
    end = measured + args.duration
    samples: list[tuple[float, float]] = []
    launch = rss_mib(pid)

    async def client_loop(i: int) -> None:
        rng = random.Random(args.seed * 1_000_003 + i)
        n = 0
        while time.perf_counter() < end:
            outcomes.append(await client.run(plan(rng, prompts, n, args)))
            n += 1

    async def watch_memory() -> None:
        every = min(RSS_EVERY, max(0.1, args.duration / 20))
        while True:
            rss = rss_mib(pid)
            if rss is not None:
                samples.append((round(time.perf_counter() - start, 2), round(rss, 1)))
            await asyncio.sleep(every)

    watcher = asyncio.create_task(watch_memory())
    try:
        await asyncio.gather(*(client_loop(i) for i in range(args.concurrency)))
    finally:
        watcher.cancel()
        await client.close()
    samples.append((round(time.perf_counter() - start, 2), rss_mib(pid)))
    window = min(MEMORY_WINDOW, args.duration / 3)
    first = [m for t, m in samples if args.warmup <= t <= args.warmup + window and m is not None]
    last = [m for t, m in samples if t >= samples[-1][0] - window and m is not None]
    memory = (launch, _median(first), _median(last), samples)
    return summarize(outcomes, measured, time.perf_counter() - measured, *memory)


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def summarize(outcomes: list[Outcome], measured: float, wall: float, launch, rss_start, rss_end, samples) -> dict:
    """Requests by ending and errors over the whole run (warm-up included); tokens/s and TTFT over
    the requests sent after the warm-up; the server's memory at launch, at the start and the end of
    the measured window (medians, module docstring) and every sample (seconds since the start, MiB)."""
    timed = [o for o in outcomes if o.sent >= measured]
    errors = [o for o in outcomes if o.error is not None]
    ended = {e: sum(o.plan.ending == e and o.error is None for o in outcomes) for e in ENDINGS}
    tokens = sum(o.tokens for o in timed)
    growth = (rss_end - rss_start) / rss_start if rss_start and rss_end is not None else None
    return {
        "requests": len(outcomes),
        "timed_requests": len(timed),
        "completed": ended["complete"],
        "cancelled": ended["cancel"],
        "disconnected": ended["disconnect"],
        "errors": len(errors),
        "error_samples": sorted({o.error for o in errors})[:5],
        "sampled": sum(o.plan.sampled for o in outcomes),
        "by_mode": {m: sum(o.plan.mode == m for o in outcomes) for m in sorted({o.plan.mode for o in outcomes})},
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "ttft_seconds": latency_summary([o.ttft for o in timed if o.ttft is not None and o.error is None]),
        "server_rss_mib": {"launch": launch, "start": rss_start, "end": rss_end, "growth": growth,
                           "samples": samples},
    }
