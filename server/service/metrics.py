"""Prometheus metrics of one server (prefix ``hedgerow_``), in a registry of its own.

Who records what:
- the engine thread (``hedgerow.server.engine.async_engine``) records what one step did: ``record_step`` for the
  speculation counters and token counts, ``record_phases`` for step times, ``record_queue`` when a
  request joins the batch, ``record_prompt`` when one is accepted, ``set_load`` for the gauges;
- the gRPC edge records what a client saw: ``record_first_token``, ``record_tokens``,
  ``record_request`` (latency and ``requests_total{status}``), ``record_rejected``; ``start_server``
  sets the gauges to 0 before the first request, so that every series exists from the start.

Which steps count as speculative: a step counts in the ``spec_*`` counters and in
``spec_acceptance_length`` only when it is a verify step: it sent at least one draft token to
verification. Plain decoding (mode ``plain``) never does, and neither does a speculative sequence's
plain step, whose draft budget came out 0 (the policy chose not to draft, or one token was left to
emit); such steps still show in ``spec_draft_budget`` as a 0, so a draft-size policy that drafts
nothing under load is visible there. Hence ``spec_accepted_tokens_total / spec_draft_tokens_total``
is the acceptance rate (accepted draft tokens / drafted tokens), and ``spec_acceptance_length``'s
mean is the mean accepted length (emitted tokens per verify step, the target's own token included).
Nothing after EOS or the length limit is ever counted: the engine reports accepted tokens so.

``spec_draft_tokens_total`` and ``spec_accepted_tokens_total`` carry a ``proposer`` label
(``model``, ``ngram``): each draft node counts for the proposer that put it in the tree, so the
labels of a step add up to its totals (``sum`` over the label is the old unlabelled counter). Both
labels are exported from the start.

``inter_token_latency_seconds`` is observed once per token of every message of a request but its
first (whose wait is ``time_to_first_token_seconds``): the time since the previous message divided
by the tokens this one brought, so its mean is decode time per token, which speculation improves.
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from hedgerow.server.errors import HedgerowError

PREFIX = "hedgerow_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
COUNT_BUCKETS = tuple(float(n) for n in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64))
# requests_total{status}: how a request ended (finish reasons; "cancelled": its client left first), or
# why it was refused (bad input, queue full, the server draining or its engine gone, no API key)
STATUSES = ("eos", "length", "stop", "abort", "cancelled", "error", "invalid_argument", "resource_exhausted",
            "unavailable", "unauthenticated")
MAX_POSITION = 64  # per-position acceptance is kept for draft positions 1..64
PROPOSERS = ("model", "ngram")  # the proposer label's values: where a draft node came from


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, PREFIX
        # Counter names are given without "_total": prometheus_client appends it.
        self.draft_tokens = Counter(p + "spec_draft_tokens", "Drafted tokens sent to verification, by proposer",
                                    ["proposer"], registry=r)
        self.accepted_tokens = Counter(p + "spec_accepted_tokens", "Accepted draft tokens, by proposer", ["proposer"],
                                       registry=r)
        for name in PROPOSERS:  # exported as 0 from the start
            self.draft_tokens.labels(name)
            self.accepted_tokens.labels(name)
        self.verify_steps = Counter(p + "spec_verify_steps", "Verify steps (per sequence)", registry=r)
        self.accepted_per_position = Counter(
            p + "spec_accepted_tokens_per_position",
            "Accepted draft tokens by position in the draft (a step accepting k counts positions 1..k)",
            ["position"], registry=r,
        )
        self.rollback_tokens = Counter(p + "spec_rollback_tokens", "Draft tokens verified but not accepted", registry=r)
        self.branches = Counter(p + "spec_branches", "Hedge branches drafted (branch-parallel drafting)", registry=r)
        self.branch_hits = Counter(p + "spec_branch_hits", "Hedge branches that became the next draft", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens committed by the engine", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.requests = Counter(p + "requests", "Requests by outcome", ["status"], registry=r)
        for status in STATUSES:
            self.requests.labels(status)  # exported as 0 from the start

        self.acceptance_length = Histogram(
            p + "spec_acceptance_length",
            "Emitted tokens per verify step, the target's own token included (its mean: the mean accepted length)",
            buckets=COUNT_BUCKETS, registry=r,
        )
        self.draft_budget = Histogram(
            p + "spec_draft_budget", "Draft budget chosen per step per speculative sequence, zeros included",
            buckets=COUNT_BUCKETS, registry=r,
        )
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time per token after the first",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram(p + "request_latency_seconds", "Request arrival to its last message",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(p + "request_queue_seconds", "Request arrival to joining the running batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram(p + "step_seconds", "Engine step time by phase", ["phase"],
                                   buckets=LATENCY_BUCKETS, registry=r)

        self.running = Gauge(p + "running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge(p + "waiting_requests", "Requests waiting for a KV slot", registry=r)
        self.kv_slots = Gauge(p + "kv_slots_in_use", "KV cache slots in use", ["model"], registry=r)

    # --- engine thread ---------------------------------------------------------------------------
    def record_step(self, *, emitted: int, draft_tokens: int, accepted_tokens: int, speculative: bool,
                    proposers: Mapping[str, object], branches: int = 0, branch_hit: bool = False) -> None:
        """One sequence's share of one engine step (see the module docstring for what counts);
        ``proposers``: the step's draft and accepted tokens by proposer (``ProposerCounts``), which
        add up to ``draft_tokens`` and ``accepted_tokens``."""
        self.generated_tokens.inc(emitted)
        self.branches.inc(branches)
        self.branch_hits.inc(int(branch_hit))
        if speculative:
            self.draft_budget.observe(draft_tokens)
        if draft_tokens <= 0:
            return
        self.verify_steps.inc()
        for name, counts in proposers.items():
            self.draft_tokens.labels(name).inc(counts.draft_tokens)
            self.accepted_tokens.labels(name).inc(counts.accepted_tokens)
        self.rollback_tokens.inc(draft_tokens - accepted_tokens)
        self.acceptance_length.observe(emitted)
        for pos in range(1, min(accepted_tokens, MAX_POSITION) + 1):
            self.accepted_per_position.labels(str(pos)).inc()

    def record_phases(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.step_time.labels(phase).observe(seconds)

    def record_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def record_queue(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def set_load(self, *, running: int, waiting: int, kv_slots: dict[str, int]) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        for model, n in kv_slots.items():
            self.kv_slots.labels(model).set(n)

    # --- gRPC edge -------------------------------------------------------------------------------
    def record_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def record_tokens(self, n: int, seconds: float) -> None:
        """``n`` tokens arrived ``seconds`` after the previous ones."""
        for _ in range(n):
            self.itl.observe(seconds / n)

    def record_request(self, status: str, seconds: float) -> None:
        self.requests.labels(status).inc()
        self.request_latency.observe(seconds)

    def record_rejected(self, status: str) -> None:
        self.requests.labels(status).inc()

    # --- exposition ------------------------------------------------------------------------------
    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve ``/metrics`` over HTTP in a daemon thread; returns the HTTP server (``server_port``,
        ``shutdown()``)."""
        try:
            httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = exc.strerror or exc
            raise HedgerowError(f"cannot serve metrics on {host}:{port} (--metrics-host/--metrics-port): "
                                f"{reason}") from None
        return httpd
