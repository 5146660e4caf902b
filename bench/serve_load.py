"""The load generator of ``hedgerow bench serve``.

For every concurrency C and every speculation mode, C clients each send a request, wait for its
last token, and send the next (a closed loop), until ``--duration`` seconds have passed or
``--requests`` requests were sent. With ``--rate R`` requests arrive instead as a Poisson process of
R per second, at most C in flight (an open loop). Modes alternate within each concurrency
(``--repeats`` rounds of plain, chain, ...), so drift hits both alike; speculation is chosen per
request, on the same server.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time

from hedgerow.bench.serve_clients import GrpcClient, OpenAIClient, Sample, error_text
from hedgerow.bench.serve_stats import summarize, vs_plain
from hedgerow.server.errors import HedgerowError


async def drive(client, prompts: list[str], mode: str, concurrency: int, args) -> tuple[list[Sample], float]:
    """Run one load level; returns the samples and the wall time (first send to last finish)."""
    samples: list[Sample] = []
    counter = itertools.count()
    start = time.perf_counter()

    def more(i: int) -> bool:
        if args.requests is not None:
            return i < args.requests
        return time.perf_counter() - start < args.duration

    async def one(i: int) -> None:
        samples.append(await client.request(prompts[i % len(prompts)], mode, args))

    if args.rate is None:  # closed loop: C clients, each one request after the other
        async def client_loop() -> None:
            while more(i := next(counter)):
                await one(i)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    else:  # open loop: Poisson arrivals, at most C in flight
        rng = random.Random(args.seed)
        gate = asyncio.Semaphore(concurrency)
        tasks = []

        async def gated(i: int) -> None:
            async with gate:
                await one(i)

        while more(i := next(counter)):
            tasks.append(asyncio.create_task(gated(i)))
            await asyncio.sleep(rng.expovariate(args.rate))
        await asyncio.gather(*tasks)
    ends = [x.sent + x.e2e for x in samples if x.e2e is not None]
    return samples, (max(ends) if ends else time.perf_counter()) - start


def _merge(parts: list[tuple[list[Sample], float]]) -> tuple[list[Sample], float]:
    return [s for samples, _ in parts for s in samples], sum(w for _, w in parts)


async def measure(args, prompts: list[str], target, started=None) -> dict:
    """Every concurrency and mode against one target (``serve_targets.Target``):
    ``{"server": its model info, "results": [...]}``, each entry naming the target. A server the
    benchmark started (``started``, a ``serve_targets.StartedTarget``) is waited for first."""
    from tqdm import tqdm

    threads = max(args.concurrency) + 2
    client = (GrpcClient(target.address, args.timeout) if target.client == "grpc"
              else OpenAIClient(target.address, args.timeout, threads))
    try:
        if started is not None:
            info = await started.wait_ready(client, args.start_timeout)
        else:
            try:
                info = await client.info()
            except Exception as exc:
                raise HedgerowError(f"cannot reach the server at {target.address}: {error_text(exc)}") from None
        for mode in args.spec_modes:
            for i in range(args.warmup):
                s = await client.request(prompts[i % len(prompts)], mode, args)
                if s.error:
                    raise HedgerowError(f"warm-up request to {target.name} (speculation {mode}) failed: {s.error}")
        results = []
        bar = tqdm(total=len(args.concurrency) * len(args.spec_modes) * args.repeats, desc=f"serve {target.name}",
                   file=sys.stderr, unit="level")
        for c in args.concurrency:
            runs: dict[str, list] = {m: [] for m in args.spec_modes}
            for r in range(args.repeats):
                order = args.spec_modes if r % 2 == 0 else args.spec_modes[::-1]
                for mode in order:
                    bar.set_postfix_str(f"concurrency {c}, {mode}")
                    runs[mode].append(await drive(client, prompts, mode, c, args))
                    bar.update()
            level = {m: summarize(*_merge(parts)) for m, parts in runs.items()}
            plain = level.get("plain")
            for mode, res in level.items():
                entry = {"target": target.name, "concurrency": c, "speculation": mode, **res, "vs_plain": None}
                if plain is not None and mode != "plain":
                    entry["vs_plain"] = vs_plain(res, plain)
                results.append(entry)
        bar.close()
        return {"server": info, "results": results}
    finally:
        await client.close()
