"""The training loop of one stage (target or draft): LR schedules, batches, thread tuning, checkpoints.

A stage trains for a fixed number of steps (``--target-steps``/``--draft-steps``: fully
deterministic, used by the tests) or for a budget of training-loop minutes. A time budget
drives a wall-clock LR schedule (linear warmup over the first steps, cosine decay over the
budget) and stops the stage when it is spent; the elapsed time is stored in the checkpoint,
so a resumed run continues the same schedule. Batches are drawn from the seed and the step
alone, so a resumed run sees the same data.
"""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class Stage:
    """One model to train, with its hyperparameters, loss and batch source."""

    name: str
    model: "object"
    lr: float
    batch: int
    minutes: float
    steps: int
    loss_fn: Callable  # (model, parts) -> (loss, metrics dict); parts = [(x, y), ...]
    batches: Callable  # step -> parts: one or more (x, y) blocks of different lengths


def _lr_at(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def _lr_time(step: int, progress: float, warmup: int, peak: float, min_ratio: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    prog = min(1.0, max(0.0, progress))
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


class ThreadTuner:
    """Pick the faster of {max_threads, 1} intra-op threads, re-probing periodically.

    On a 2-core machine shared with other CPU-bound processes, 2 OpenMP threads that
    spin at barriers can be several times slower than 1 thread; uncontended, 2 win.
    """

    def __init__(self, max_threads: int, enabled: bool, every: int = 60, probe: int = 6):
        import torch

        self.torch = torch
        self.choices = sorted({max(1, max_threads), 1}, reverse=True)
        self.enabled = enabled and len(self.choices) > 1
        self.every, self.probe = every, probe
        self.cur = self.choices[0]
        self.base = self.cur
        self.hist: dict[int, list[float]] = {c: [] for c in self.choices}
        self.n = 0
        self.probing = 0
        self.ref: dict[int, float] = {}
        torch.set_num_threads(self.cur)

    def record(self, dt: float):
        if not self.enabled:
            return None
        self.n += 1
        h = self.hist[self.cur]
        h.append(dt)
        del h[:-self.probe]
        if not self.probing and len(h) >= self.probe:
            med_now = sorted(h)[len(h) // 2]
            self.ref[self.cur] = min(self.ref.get(self.cur, med_now), med_now)
        if self.probing:
            self.probing -= 1
            if self.probing == 0:
                med = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2] if len(xs) > 1 else float("inf")
                a, b = med(self.hist[self.base]), med(self.hist[self.cur])
                probed = self.cur
                best = probed if b < a else self.base
                self.ref[probed] = b
                self.recent = []
                self.last_probe = self.n
                self._set(best)
                return f"threads {self.base}: {a:.2f} s/step, {probed}: {b:.2f} s/step -> using {best}"
        elif self.n % self.every == 0 or self._slowed():
            self.base = self.cur
            self.hist[self.base] = self.hist[self.base][-self.probe:]
            self.hist[[c for c in self.choices if c != self.cur][0]] = []
            self._set([c for c in self.choices if c != self.cur][0])
            self.probing = self.probe
        return None

    def _slowed(self) -> bool:
        """The last 3 steps are all much slower than this thread count's usual pace."""
        self.recent = (getattr(self, "recent", []) + [self.hist[self.cur][-1]])[-3:]
        ref = self.ref.get(self.cur)
        if ref is None or len(self.recent) < 3 or self.n - getattr(self, "last_probe", 0) < 8:
            return False
        return min(self.recent) > 1.7 * ref

    def _set(self, n: int):
        self.cur = n
        self.torch.set_num_threads(n)


def window_batch(stream, step: int, batch: int, seq_len: int, seed: int):
    """Deterministic random windows for a given step (independent of resume point)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted save never leaves a torn file."""
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fill_resumable(state: dict, path: Path, key: str, want: int, budget_s: float, batch: int,
                   produce: Callable, desc: str, no_progress: bool) -> None:
    """Grow a saved pool batch by batch: ``produce(b, n)`` makes batch b of n rows as
    {name: tensor}, appended to ``state[name]``; it stops at ``want`` rows (counted in
    ``state[key]``) or, with ``want`` 0, once ``budget_s`` seconds were spent in ``produce``. The state
    is saved to ``path`` after every batch and marked done at the end, so a rerun resumes or skips."""
    from tqdm.auto import tqdm

    have = sum(len(t) for t in state[key])
    pbar = tqdm(total=want or None, initial=have, desc=desc, unit="row", disable=no_progress,
                dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    while not state["done"]:
        if (want and have >= want) or (not want and state["elapsed_s"] >= budget_s):
            state["done"] = True
            atomic_save(state, path)
            break
        n = min(batch, want - have) if want else batch
        t0 = time.time()
        new = produce(len(state[key]), n)
        state["elapsed_s"] += time.time() - t0
        for name, t in new.items():
            state[name].append(t)
        have += n
        atomic_save(state, path)
        pbar.update(n)
    pbar.close()


def name_seed(seed: int, name: str) -> int:
    """The seed of one named draw of rows (a stage's batches, the teacher's windows): ``seed``
    shifted by the name, so the draws differ from each other and each is the same on a rerun."""
    return seed + zlib.crc32(name.encode()) % 997


def stream_batches(stream, name: str, batch: int, args) -> Callable:
    seed = name_seed(args.seed, name)
    return lambda step: [window_batch(stream, step, batch, args.seq_len, seed)]


def mixed_batches(stream, rows, name: str, batch: int, args) -> Callable:
    """Each step: ``round(batch * greedy_fraction)`` greedy rows (drawn like the windows, from the
    seed and the step) and the rest as windows of the stream."""
    import torch

    seed = name_seed(args.seed, name)
    n_greedy = 0 if rows is None or len(rows) == 0 else min(batch, round(batch * args.greedy_fraction))

    def fn(step: int):
        parts = []
        if batch - n_greedy:
            parts.append(window_batch(stream, step, batch - n_greedy, args.seq_len, seed))
        if n_greedy:
            g = torch.Generator().manual_seed(seed * 1_000_033 + step)
            chunk = rows[torch.randint(0, len(rows), (n_greedy,), generator=g)].long()
            parts.append((chunk[:, :-1], chunk[:, 1:]))
        return parts

    return fn


def train_stage(stage: Stage, args, log) -> dict:
    """Train one model; resumable via <work_dir>/<name>.ckpt.pt. Returns the stage record."""
    import torch
    from tqdm.auto import tqdm

    ckpt_path = args.work_dir / f"{stage.name}.ckpt.pt"
    model = stage.model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.lr, betas=(0.9, 0.95), eps=1e-8, fused=False,
    )
    state = {"step": 0, "total_steps": stage.steps or 0, "elapsed_s": 0.0, "done": False,
             "losses": [], "warmup": args.warmup_steps}
    if stage.steps:
        state["warmup"] = min(args.warmup_steps, max(1, stage.steps // 10))
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        state = ck["state"]
        log(f"[{stage.name}] resumed from {ckpt_path} at step {state['step']}"
            f" ({state['elapsed_s'] / 60:.1f} min done, done={state['done']})")
    if state["done"]:
        return state

    def save():
        atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, ckpt_path)

    budget_s = stage.minutes * 60.0
    bf16 = not args.no_bf16
    model.train()
    pbar = tqdm(total=state["total_steps"] or None, initial=state["step"], desc=stage.name,
                disable=args.no_progress, dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    last_ckpt = time.time()
    steps_this_run = 0
    ema = None
    tuner = ThreadTuner(args.threads, not args.no_adaptive_threads)
    while True:
        step = state["step"]
        if state["total_steps"] and step >= state["total_steps"]:
            break
        if not stage.steps and state["elapsed_s"] >= budget_s:
            log(f"[{stage.name}] time budget of {stage.minutes:.1f} min reached at step {step}")
            break
        t0 = time.time()
        if stage.steps:
            lr = _lr_at(step, state["total_steps"], state["warmup"], stage.lr, args.min_lr_ratio)
        else:
            # Wall-clock schedule: linear warmup over the first steps, cosine decay over the
            # time budget.  Robust to CPU contention (the shared 2-core box), ends on time.
            lr = _lr_time(step, state["elapsed_s"] / budget_s, state["warmup"], stage.lr, args.min_lr_ratio)
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, metrics = stage.loss_fn(model, stage.batches(step))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        state["elapsed_s"] += dt
        state["step"] = step + 1
        steps_this_run += 1
        msg = tuner.record(dt)
        if msg:
            log(f"[{stage.name}] step {step} {msg}")
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 10 == 0:
            state["losses"].append((step, round(lv, 4), {k: round(float(v), 4) for k, v in metrics.items()}))
        if not stage.steps:
            pbar.total = max(state["step"], int(state["step"] * budget_s / max(1e-6, state["elapsed_s"])))
        pbar.update(1)
        pbar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", gn=f"{float(gnorm):.2f}", refresh=False)
        if step % 100 == 0:
            extra = " ".join(f"{k}={float(v):.3f}" for k, v in metrics.items())
            log(f"[{stage.name}] step {step} loss {lv:.4f} (ema {ema:.4f}) {extra} lr {lr:.2e}"
                f" elapsed {state['elapsed_s'] / 60:.1f} min")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
        if args.stop_after_steps and steps_this_run >= args.stop_after_steps:
            save()
            pbar.close()
            log(f"[{stage.name}] stopping after {steps_this_run} steps (--stop-after-steps); rerun to resume")
            raise SystemExit(3)
    pbar.close()
    state["done"] = True
    state["final_step"] = state["step"]
    save()
    log(f"[{stage.name}] done: {state['step']} steps in {state['elapsed_s'] / 60:.1f} min")
    return state
