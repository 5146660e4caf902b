"""The clients of ``hedgerow bench serve``: one streamed request each, timed as a ``Sample``.

- ``GrpcClient`` (``--grpc ADDR``): ``hedgerow.v1.Generation/GenerateStream`` (stubs in
  ``server.rpc``); the mode goes in ``GenerateRequest.speculation.mode``; token counts come from
  each message's ``token_ids``.
- ``OpenAIClient`` (``--openai URL``): ``POST URL/v1/completions`` with ``"stream": true`` (OpenAI
  SSE: ``data: {json}`` lines, ``data: [DONE]`` at the end), plain ``urllib`` in a thread per
  in-flight request. The mode goes in the proxy's Hedgerow extension object
  ``"hedgerow": {"speculation": {"mode": "plain" | "chain" | "tree"}}`` (``hedgerow proxy``; other
  servers refuse or ignore it). The SSE chunks carry text only: the token count is
  ``usage.completion_tokens`` of the last chunk when the server sends it (we ask with
  ``stream_options.include_usage``), else one per chunk; the inter-token gaps are spread evenly
  over a request's chunks accordingly.

Prompts go as text (the server tokenizes); MT-Bench questions as plain text, without a chat template.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import urllib.request
from dataclasses import dataclass, field


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
        self.modes = {"plain": pb.SPECULATION_MODE_PLAIN, "chain": pb.SPECULATION_MODE_CHAIN,
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
            s.error = error_text(exc)
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
                return {"error": error_text(exc)}

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
            s.error = error_text(exc)
            return s
        s.e2e = time.perf_counter() - s.sent
        n_chunks = len(chunks) + (s.ttft is not None)
        s.tokens = usage if usage is not None else n_chunks
        per_chunk = max(1, round(s.tokens / n_chunks)) if n_chunks else 1
        s.gaps = [(g, per_chunk) for g in chunks]
        return s

    async def close(self) -> None:
        self.pool.shutdown(wait=False)


def error_text(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return f"{type(exc).__name__}: {(text or '').splitlines()[0] if text else ''}"
