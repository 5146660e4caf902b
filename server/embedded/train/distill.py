"""The losses of both stages (CE; the draft's distillation) and the target's greedy continuations.

The target learns with CE on windows of the token stream. The draft learns with a mix
of KL(target || draft) on the target's next-token distribution and CE, on batches that
take ``--greedy-fraction`` of their rows from the target's greedy continuations of the
training stream (``--greedy-minutes``): the text speculative decoding verifies is the
target's own output, so the draft studies it.
"""

from __future__ import annotations

from hedgerow.server.embedded.train.loop import fill_resumable
from hedgerow.server.embedded.train.teacher import greedy_pool, topk_of


def ce_loss_fn(model, parts):
    """Next-token CE, token-weighted over the parts; the target's loss."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    for x, y in parts:
        logits = model(input_ids=x).logits.float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        n += y.numel()
    return total / n, {}


def make_kd_loss_fn(teacher, alpha: float, temperature: float):
    """The draft's loss: ``alpha * KL(teacher || model) + (1 - alpha) * CE``, at ``temperature``."""
    import torch
    import torch.nn.functional as F

    def fn(model, parts):
        T = temperature
        ce = kl = agree = 0.0
        n = sum(y.numel() for _, y in parts)
        for x, y in parts:  # token-weighted sums over blocks of different lengths
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits.float()
            s_logits = model(input_ids=x).logits.float()
            V = s_logits.size(-1)
            s_flat, t_flat = s_logits.reshape(-1, V), t_logits.reshape(-1, V)
            ce = ce + F.cross_entropy(s_flat, y.reshape(-1), reduction="sum") / n
            kl = kl + F.kl_div(F.log_softmax(s_flat / T, -1), F.log_softmax(t_flat / T, -1),
                               log_target=True, reduction="sum") * (T * T) / n
            with torch.no_grad():
                agree = agree + (s_flat.argmax(-1) == t_flat.argmax(-1)).float().sum() / n
        return alpha * kl + (1 - alpha) * ce, {"ce": ce.detach(), "kl": kl.detach(), "top1_agree": agree}

    return fn


def generate_greedy_rows(target, stream, eos: int, args, log):
    """Rows of ``greedy_prefix`` corpus tokens followed by ``greedy_new`` greedy tokens of the target.

    Speculative decoding verifies drafts against the target's own continuations, which differ from
    the corpus (small models fall into loops and favourite phrases); a draft trained on them agrees
    with the target more often where it matters. Batch b starts from windows drawn from the seed
    and b; rows are saved after every batch in <work_dir>/greedy.pt, so a rerun resumes. Returns an
    int tensor [rows, prefix + new] (None when disabled) and, with ``--teacher cached``, the rows as
    a pool with the target's top-k at the generated positions (``teacher.greedy_pool``; else None).
    """
    import torch

    want, budget_s = args.greedy_rows, args.greedy_minutes * 60.0
    if not want and budget_s <= 0:
        return None, None
    path = args.work_dir / "greedy.pt"
    keep_topk = args.teacher == "cached"
    state = {"rows": [], "topk_logp": [], "topk_idx": [], "elapsed_s": 0.0, "done": False}
    if path.exists():
        state = torch.load(path, weights_only=False)
        log(f"[greedy] resumed from {path}: {sum(len(r) for r in state['rows'])} rows")
        if keep_topk and len(state.get("topk_idx", ())) != len(state["rows"]):
            raise SystemExit(f"{path} was written without the target's top-k (by --teacher online, or an "
                             "older trainer): remove it, or train with --teacher online")
    target.eval()

    def produce(b: int, n: int) -> dict:
        g = torch.Generator().manual_seed(args.seed * 7919 + b)
        starts = torch.randint(0, len(stream) - args.greedy_prefix, (n,), generator=g)
        x = stream[starts[:, None] + torch.arange(args.greedy_prefix)[None, :]].long()
        # min_new_tokens keeps every row full length (eos is masked out until then); the logits
        # kept are the target's own, before that mask
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=args.greedy_new, min_new_tokens=args.greedy_new,
                                  pad_token_id=eos, eos_token_id=eos, return_dict_in_generate=True,
                                  output_logits=keep_topk)
            new = {"rows": out.sequences.to(torch.int32)}
            if keep_topk:
                new["topk_logp"], new["topk_idx"] = topk_of(torch.stack(out.logits, 1), args.teacher_topk)
        return new

    fill_resumable(state, path, "rows", want, budget_s, args.greedy_batch, produce, "greedy", args.no_progress)
    rows = torch.cat(state["rows"])
    log(f"[greedy] {len(rows)} rows x {rows.shape[1]} tokens ({len(rows) * args.greedy_new} generated)"
        f" in {state['elapsed_s'] / 60:.1f} min")
    if not keep_topk:
        return rows, None
    return rows, greedy_pool(rows, torch.cat(state["topk_idx"]), torch.cat(state["topk_logp"]), args.greedy_prefix)
