"""Latency under load: a running server, driven at several concurrencies, speculation on and off.

    hedgerow bench serve --grpc 127.0.0.1:50051 --concurrency 1,4,16,64 --duration 30
    hedgerow bench serve --openai http://127.0.0.1:8000 --concurrency 1,4 --requests 64

For every concurrency C and every speculation mode (``--spec-modes``, default ``off,chain``), C
clients each send a request, wait for its last token, and send the next (a closed loop), until
``--duration`` seconds have passed or ``--requests`` requests were sent. With ``--rate R`` requests
arrive instead as a Poisson process of R per second, at most C in flight (an open loop).
Modes alternate within each concurrency (``--repeats`` rounds of off, chain, ...), so drift hits
both alike; speculation is chosen per request, on the same server.

Per request: TTFT (send -> first token), end-to-end latency, and inter-token latency: a stream
message carrying k tokens after a gap g counts as k tokens g / k apart (speculative steps commit
several tokens at once, and that is what a client sees). Reported: mean/p50/p90/p99 of each,
output tokens/s and requests/s over the run's wall time (first send to last finish), and, for each
speculative mode, its ratio to ``off`` at the same concurrency.

Prompts go as text (the server tokenizes); MT-Bench questions as plain text, without a chat template.

Clients:
- ``--grpc ADDR``: ``hedgerow.v1.Generation/GenerateStream`` (stubs in ``server.rpc``); the mode
  goes in ``GenerateRequest.speculation.mode``; token counts come from each message's ``token_ids``.
- ``--openai URL``: ``POST URL/v1/completions`` with ``"stream": true`` (OpenAI SSE: ``data: {json}``
  lines, ``data: [DONE]`` at the end), plain ``urllib`` in a thread per in-flight request. The mode
  goes in the proxy's Hedgerow extension object ``"hedgerow": {"speculation": {"mode": "off" | "chain" |
  "tree"}}`` (``hedgerow proxy``; other servers refuse or ignore it).
  The SSE chunks carry text only: the token count is ``usage.completion_tokens`` of the last chunk
  when the server sends it (we ask with ``stream_options.include_usage``), else one per chunk; the
  inter-token gaps are spread evenly over a request's chunks accordingly.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from hedgerow.bench.common import (
    csv,
    fmt,
    latency_summary,
    markdown_table,
    new_config,
    note_start,
    ratio,
    remember_parser,
    write_json,
)
from hedgerow.server.engine.errors import HedgerowError

SPEC_MODES = ("off", "chain", "tree")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server").add_mutually_exclusive_group(required=True)
    g.add_argument("--grpc", metavar="ADDR", help="host:port of a `hedgerow serve` gRPC server")
    g.add_argument("--openai", metavar="URL", help="base URL of an OpenAI-compatible server (…/v1/completions)")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=csv(int, "--concurrency"), default=[1, 4, 16, 64],
                   help="clients in flight, a list (default: 1,4,16,64)")
    g.add_argument("--duration", type=float, default=None, help="seconds per concurrency and mode (default: 30)")
    g.add_argument("--requests", type=int, default=None, help="requests per concurrency and mode, instead of --duration")
    g.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second (default: closed loop)")
    g.add_argument("--spec-modes", type=csv(str, "--spec-modes"), default=["off", "chain"],
                   help="speculation modes to compare, off first (default: off,chain)")
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
    g.add_argument("--server-command", default=None,
                   help="the command line that started the server, recorded in the JSON for the report")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    remember_parser(p, "serve")


# --- one request ---------------------------------------------------------------------------------
@dataclass
class Sample:
    sent: float  # perf_counter at send
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    gaps: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the previous message, tokens)
    error: str | None = None

    def itl(self) -> list[float]:
        """Per-token inter-token latencies (a message of k tokens after g seconds: k times g / k)."""
        out = []
        for gap, k in self.gaps:
            out += [gap / k] * k if k else []
        return out


class GrpcClient:
    def __init__(self, addr: str, timeout: float):
        import grpc

        from hedgerow.server.rpc import generation_pb2 as pb
        from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc

        self.pb = pb
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(addr)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.modes = {"off": pb.SPECULATION_MODE_OFF, "chain": pb.SPECULATION_MODE_CHAIN,
                      "tree": pb.SPECULATION_MODE_TREE}

    async def info(self) -> dict:
        from google.protobuf.json_format import MessageToDict

        reply = await self.stub.ModelInfo(self.pb.ModelInfoRequest(), timeout=30)
        return MessageToDict(reply, preserving_proto_field_name=True)

    async def request(self, prompt: str, mode: str, args) -> Sample:
        pb = self.pb
        msg = pb.GenerateRequest(
            prompt=prompt,
            sampling=pb.SamplingParams(temperature=args.temperature),
            stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos),
            speculation=pb.SpeculationParams(mode=self.modes[mode]),
        )
        s = Sample(time.perf_counter())
        last = s.sent
        try:
            async for part in self.stub.GenerateStream(msg, timeout=self.timeout):
                k = len(part.token_ids)
                if k:
                    now = time.perf_counter()
                    if s.ttft is None:
                        s.ttft = now - s.sent
                    else:
                        s.gaps.append((now - last, k))
                    last = now
                    s.tokens += k
        except Exception as exc:  # grpc.aio.AioRpcError: one failed request, counted, not fatal
            s.error = _error_text(exc)
            return s
        s.e2e = time.perf_counter() - s.sent
        return s

    async def close(self) -> None:
        await self.channel.close()


class OpenAIClient:
    """Blocking ``urllib`` streaming, one worker thread per in-flight request."""

    def __init__(self, url: str, timeout: float, threads: int):
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.timeout = timeout
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)

    async def info(self) -> dict:
        def get():
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=30) as r:
                    return json.load(r)
            except Exception as exc:
                return {"error": _error_text(exc)}

        return await asyncio.get_running_loop().run_in_executor(self.pool, get)

    async def request(self, prompt: str, mode: str, args) -> Sample:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._blocking, prompt, mode, args)

    def _blocking(self, prompt: str, mode: str, args) -> Sample:
        body = {
            "model": args.model, "prompt": prompt, "max_tokens": args.max_new_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            "hedgerow": {"speculation": {"mode": mode}},  # Hedgerow extension (hedgerow proxy)
        }
        if args.ignore_eos:
            body["ignore_eos"] = True  # extension understood by vLLM-style servers
        req = urllib.request.Request(self.url + "/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        s = Sample(time.perf_counter())
        last, chunks, usage = s.sent, [], None
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"].get("completion_tokens")
                    if not any(c.get("text") for c in chunk.get("choices") or []):
                        continue
                    now = time.perf_counter()
                    if s.ttft is None:
                        s.ttft = now - s.sent
                    else:
                        chunks.append(now - last)
                    last = now
        except Exception as exc:
            s.error = _error_text(exc)
            return s
        s.e2e = time.perf_counter() - s.sent
        n_chunks = len(chunks) + (s.ttft is not None)
        s.tokens = usage if usage is not None else n_chunks
        per_chunk = max(1, round(s.tokens / n_chunks)) if n_chunks else 1
        s.gaps = [(g, per_chunk) for g in chunks]
        return s

    async def close(self) -> None:
        self.pool.shutdown(wait=False)


def _error_text(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return f"{type(exc).__name__}: {(text or '').splitlines()[0] if text else ''}"


# --- load ----------------------------------------------------------------------------------------
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


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1 and s.ttft is not None]
    errors = sorted({s.error for s in samples if s.error})
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "errors": errors[:5],
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "requests_per_second": len(ok) / wall if wall > 0 else None,
        "ttft_seconds": latency_summary([s.ttft for s in ok if s.ttft is not None]),
        "itl_seconds": latency_summary([x for s in ok for x in s.itl()]),
        "tpot_seconds": latency_summary(tpot),
        "e2e_seconds": latency_summary([s.e2e for s in ok]),
        # raw values for the latency CDF plots
        "samples": {
            "ttft": [round(s.ttft, 6) for s in ok if s.ttft is not None],
            "e2e": [round(s.e2e, 6) for s in ok],
            "tokens": [s.tokens for s in ok],
        },
    }


def _merge(parts: list[tuple[list[Sample], float]]) -> tuple[list[Sample], float]:
    return [s for samples, _ in parts for s in samples], sum(w for _, w in parts)


async def bench(args, prompts: list[str]) -> dict:
    from tqdm import tqdm

    threads = max(args.concurrency) + 2
    client = GrpcClient(args.grpc, args.timeout) if args.grpc else OpenAIClient(args.openai, args.timeout, threads)
    try:
        try:
            info = await client.info()
        except Exception as exc:
            where = args.grpc or args.openai
            raise HedgerowError(f"cannot reach the server at {where}: {_error_text(exc)}") from None
        for mode in args.spec_modes:
            for i in range(args.warmup):
                s = await client.request(prompts[i % len(prompts)], mode, args)
                if s.error:
                    raise HedgerowError(f"warm-up request (speculation {mode}) failed: {s.error}")
        results = []
        bar = tqdm(total=len(args.concurrency) * len(args.spec_modes) * args.repeats, desc="serve",
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
            off = level.get("off")
            for mode, res in level.items():
                entry = {"concurrency": c, "speculation": mode, **res, "vs_off": None}
                if off is not None and mode != "off":
                    entry["vs_off"] = {
                        "tokens_per_second": ratio(res["tokens_per_second"], off["tokens_per_second"]),
                        "requests_per_second": ratio(res["requests_per_second"], off["requests_per_second"]),
                        # latency ratios as speedups: off / on (> 1 means speculation is faster)
                        "e2e_p50_speedup": ratio(off["e2e_seconds"]["p50"], res["e2e_seconds"]["p50"]),
                        "ttft_p50_speedup": ratio(off["ttft_seconds"]["p50"], res["ttft_seconds"]["p50"]),
                        "itl_p50_speedup": ratio(off["itl_seconds"]["p50"], res["itl_seconds"]["p50"]),
                    }
                results.append(entry)
        bar.close()
        return {"server": info, "results": results}
    finally:
        await client.close()


def run(args) -> int:
    from hedgerow.bench.prompts import load_prompts

    note_start(args)
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
        raise HedgerowError(f"--spec-modes: {','.join(args.spec_modes)} is not a list of distinct off, chain, tree")
    if args.repeats < 1 or args.warmup < 0 or args.max_new_tokens < 1:
        raise HedgerowError("--repeats and --max-new-tokens must be >= 1, --warmup >= 0")
    prompts = load_prompts(args.prompts, args.num_prompts)
    out = asyncio.run(bench(args, prompts))
    data = {
        "config": new_config(
            "serve", args, client="grpc" if args.grpc else "openai", address=args.grpc or args.openai,
            server=out["server"], server_command=args.server_command, concurrency=args.concurrency,
            duration=args.duration, requests=args.requests, rate=args.rate, spec_modes=args.spec_modes,
            repeats=args.repeats, prompts=args.prompts, num_prompts=len(prompts),
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos,
        ),
        "results": out["results"],
    }
    write_json(args.output, data)
    print(table(data))
    if args.plots:
        from pathlib import Path

        from hedgerow.bench.plots import serve_plots

        for path in serve_plots(data, args.plots, stem=Path(args.output).stem if args.output else "serve"):
            print(f"wrote {path}", file=sys.stderr)
    failed = sum(r["failed"] for r in data["results"])
    if failed:
        print(f"hedgerow: warning: {failed} request(s) failed", file=sys.stderr)
    return 0


def table(data: dict) -> str:
    headers = ["concurrency", "speculation", "tokens/s", "req/s", "TTFT p50/p90/p99 (ms)", "ITL p50/p90/p99 (ms)",
               "e2e p50/p90/p99 (s)", "tokens/s vs off", "failed"]

    def ms(d):
        return "/".join(fmt(None if d[q] is None else d[q] * 1000, 1) for q in ("p50", "p90", "p99"))

    def sec(d):
        return "/".join(fmt(d[q], 2) for q in ("p50", "p90", "p99"))

    rows = [[r["concurrency"], r["speculation"], fmt(r["tokens_per_second"], 1), fmt(r["requests_per_second"], 2),
             ms(r["ttft_seconds"]), ms(r["itl_seconds"]), sec(r["e2e_seconds"]),
             fmt(r["vs_off"]["tokens_per_second"], 2, "×") if r["vs_off"] else "—", r["failed"]]
            for r in data["results"]]
    return markdown_table(headers, rows)
