"""The engine's per-token logprobs (``verify.logprobs.TokenLogprob``) as protobuf messages, each
token decoded alone. Run on the service's worker threads: it decodes up to 21 tokens per token."""

from __future__ import annotations

from hedgerow.server.rpc import generation_pb2 as pb


def logprob_messages(tokenizer, entries) -> list[pb.TokenLogprob]:
    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    return [pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob, token=text(e.token_id),
                            top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp, token=text(t)) for t, lp in e.top])
            for e in entries]
