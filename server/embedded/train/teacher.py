"""The teacher's next-token distributions computed once and kept: the draft's cached distillation.

With ``--teacher cached`` (the default) the target runs once over a fixed pool of training rows
and its top-``--teacher-topk`` log-probabilities at every position are kept (float16 values, int16
token ids); the draft then trains for as many epochs over that pool as its budget buys, without a
target pass per step. On a CPU the target's pass was most of a draft step (about 1.1 of 2 s for
8 x 512 tokens in float32), so the same minutes buy several times the draft steps.

The pool has two parts:

- the greedy continuations (``distill.generate_greedy_rows``): the target's distributions at
  the generated positions are the logits ``generate`` computed to pick each token, recorded as it
  goes, so they cost nothing more;
- windows of the training stream (``--teacher-minutes`` or ``--teacher-windows``), one teacher
  pass each, batched.

The loss (``make_topk_kd_loss_fn``) is the KL divergence between the teacher's and the draft's
distributions coarsened to k + 1 outcomes: the teacher's top-k tokens one by one, and "any other
token" as one outcome holding the rest of each side's mass. That is exactly computable from what
was kept, never more than the full KL (coarsening only merges outcomes), and equal to it where
the teacher's top-k hold all of its mass. It is mixed with CE on the rows' next tokens like the
online loss.
"""

from __future__ import annotations

from hedgerow.server.embedded.train.loop import fill_resumable, name_seed, window_batch
from hedgerow.server.errors import HedgerowError


def topk_of(logits, k: int):
    """The top-``k`` log-probabilities of ``logits`` [..., V] as (float16 values, int16 ids)."""
    import torch

    logp = torch.log_softmax(logits.float(), -1)
    v, i = logp.topk(min(k, logp.size(-1)), -1)
    return v.half(), i.to(torch.int16)


def cache_windows(teacher, stream, args, log):
    """The teacher's top-k on windows of ``stream`` (``--teacher-windows`` of them, or as many as
    ``--teacher-minutes`` buy), batched by ``--draft-batch``; resumable from <work_dir>/teacher.pt.

    Window b is drawn from the seed and b like the training loop's, so a rerun resumes the same
    pool. Returns a dict of tensors ``x``, ``y`` [N, L] (int32) and ``idx``, ``logp`` [N, L, k],
    or None when the pool is empty.
    """
    import torch

    want, budget_s = args.teacher_windows, args.teacher_minutes * 60.0
    path = args.work_dir / "teacher.pt"
    state = {"x": [], "y": [], "idx": [], "logp": [], "elapsed_s": 0.0, "done": False}
    if path.exists():
        state = torch.load(path, weights_only=False)
        log(f"[teacher] resumed from {path}: {sum(len(x) for x in state['x'])} windows")
    seed = name_seed(args.seed, "teacher")

    def produce(b: int, n: int) -> dict:
        x, y = window_batch(stream, b, n, args.seq_len, seed)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            logp, idx = topk_of(teacher(input_ids=x).logits, args.teacher_topk)
        return {"x": x.to(torch.int32), "y": y.to(torch.int32), "idx": idx, "logp": logp}

    fill_resumable(state, path, "x", want, budget_s, args.draft_batch, produce, "teacher", args.no_progress)
    have = sum(len(x) for x in state["x"])
    if not have:
        return None
    log(f"[teacher] {have} windows x {args.seq_len} tokens, top-{args.teacher_topk}, "
        f"in {state['elapsed_s'] / 60:.1f} min")
    return {key: torch.cat(state[key]) for key in ("x", "y", "idx", "logp")}


def greedy_pool(rows, idx, logp, prefix: int):
    """The greedy continuations as a pool like ``cache_windows``'s: ``rows`` [N, prefix + new] and
    the teacher's top-k at the ``new`` positions that chose a token ([N, new, k]); the first
    ``prefix - 1`` positions (corpus text) have no teacher entry and are masked out of the KL."""
    import torch

    n, length = rows.shape
    pad = length - 1 - idx.shape[1]
    assert pad == prefix - 1, (pad, prefix)
    full_idx = torch.cat([idx.new_zeros(n, pad, idx.shape[2]), idx], 1)
    full_logp = torch.cat([logp.new_zeros(n, pad, logp.shape[2]), logp], 1)
    mask = torch.zeros(n, length - 1, dtype=torch.bool)
    mask[:, pad:] = True
    return {"x": rows[:, :-1], "y": rows[:, 1:], "idx": full_idx, "logp": full_logp, "mask": mask}


def cached_batches(windows, greedy, name: str, batch: int, args):
    """Each step: ``round(batch * greedy_fraction)`` rows of the greedy pool and the rest from the
    windows' pool, drawn from the seed and the step; parts are (x, y, idx, logp, mask)."""
    import torch

    seed = name_seed(args.seed, name)
    n_greedy = 0 if greedy is None else min(batch, round(batch * args.greedy_fraction))
    if windows is None:
        n_greedy = batch
    if greedy is None and windows is None:
        raise HedgerowError("the cached teacher has no rows: give --teacher-minutes/--teacher-windows or greedy rows "
                            "(--greedy-minutes/--greedy-rows)")

    if windows is not None:  # every window position has the teacher's top-k
        windows = {**windows, "mask": torch.ones(windows["x"].shape, dtype=torch.bool)}

    def take(pool, n, salt, step):
        g = torch.Generator().manual_seed(seed * 1_000_033 + step * 2 + salt)
        pick = torch.randint(0, len(pool["x"]), (n,), generator=g)
        return (pool["x"][pick].long(), pool["y"][pick].long(), pool["idx"][pick].long(),
                pool["logp"][pick].float(), pool["mask"][pick])

    def fn(step: int):
        parts = []
        if batch - n_greedy:
            parts.append(take(windows, batch - n_greedy, 0, step))
        if n_greedy:
            parts.append(take(greedy, n_greedy, 1, step))
        return parts

    return fn


def make_topk_kd_loss_fn(alpha: float):
    """``alpha * KL_k(teacher || model) + (1 - alpha) * CE`` over parts (x, y, idx, logp, mask):
    KL_k is the KL of the distributions coarsened to the teacher's top-k tokens and the rest
    (module docstring), over masked positions; CE over every position."""
    import torch
    import torch.nn.functional as F

    def fn(model, parts):
        n = sum(p[1].numel() for p in parts)
        m = sum(int(p[4].sum()) for p in parts)
        ce = kl = agree = 0.0
        for x, y, idx, t_logp, mask in parts:
            s_logp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
            ce = ce - s_logp.gather(-1, y[..., None]).sum() / n
            s_top = s_logp.gather(-1, idx)
            t_top = t_logp.exp()
            t_rest = (1.0 - t_top.sum(-1)).clamp_min(0.0)
            s_rest = torch.log1p(-torch.logsumexp(s_top, -1).exp().clamp(max=1.0 - 1e-6))
            term = (t_top * (t_logp - s_top)).sum(-1) + torch.xlogy(t_rest, t_rest) - t_rest * s_rest
            kl = kl + (term * mask).sum() / max(m, 1)
            with torch.no_grad():
                agree = agree + ((s_logp.argmax(-1) == idx[..., 0]) & mask).sum() / max(m, 1)
        return alpha * kl + (1 - alpha) * ce, {"ce": ce.detach(), "kl": kl.detach(), "top1_agree": agree}

    return fn
