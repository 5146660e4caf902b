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
5. teacher  -- with ``--teacher cached`` (the default), the target's top-k next-token
               distributions on windows of the training stream (``--teacher-minutes``),
               kept with those it computed while generating the greedy continuations.
6. draft    -- a much smaller Llama, trained with a mix of KL(target || draft) on the
               target's next-token distribution and CE, on batches that take
               ``--greedy-fraction`` of their rows from the greedy continuations and the
               rest from the training stream: with ``--teacher cached`` epochs over the
               kept pool (``teacher``), with ``--teacher online`` fresh windows and a
               target pass every step.
7. export   -- both models in Hugging Face format (bfloat16 on disk) plus the
               shared tokenizer files, into ``--out-dir``; the shipped pair's folder
               (the package's ``server/embedded``) only with ``--overwrite-embedded``.
8. eval     -- held-out loss/perplexity of both exported models, and greedy
               chain-speculative acceptance with 4 draft tokens on the first 20 HumanEval
               prompts (simulated with the HF models).

Stages 1-2 are in ``corpus``, 3 and 6 run the loop of ``loop`` with the losses of
``distill`` and ``teacher``, 4 is in ``distill``, 5 in ``teacher``, 7 in ``models`` and 8 in
``evaluate``; this module
parses the flags and runs the stages in order.

Time budgets (``--target-minutes``/``--draft-minutes``) drive a wall-clock LR
schedule (linear warmup over the first steps, cosine decay over the budget) and
stop each stage when its budget of training-loop time is spent; the elapsed time
is stored in the checkpoint, so a resumed run continues the same schedule.
``--target-steps``/``--draft-steps`` fix the step counts instead (fully
deterministic, used by the tests). ``--target-from DIR`` skips stages 2-3: the target
and its tokenizer are read from an exported folder (for example the shipped
``server/embedded/target``) and only a new draft is trained for it.

Usage::

    hedgerow train-pair --work-dir /tmp/hedgerow-pair --out-dir /tmp/pair          # train + export + eval
    hedgerow train-pair --eval-only                                                # eval the shipped pair
    hedgerow train-pair --work-dir /tmp/d --out-dir /tmp/pair --target-from server/embedded/target   # new draft only
    hedgerow train-pair --work-dir /tmp/hedgerow-pair --overwrite-embedded         # replace the shipped pair

(``python -m hedgerow.server.embedded.train`` is the same command.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hedgerow.server.embedded.train.corpus import (
    collect_corpus,
    encode_docs,
    stdlib_root,
    train_tokenizer,
    wrap_tokenizer,
)
from hedgerow.server.embedded.train.distill import ce_loss_fn, generate_greedy_rows, make_kd_loss_fn
from hedgerow.server.embedded.train.evaluate import evaluate_pair
from hedgerow.server.embedded.train.loop import Stage, mixed_batches, stream_batches, train_stage
from hedgerow.server.embedded.train.models import cost_per_token, export_model, llama_config
from hedgerow.server.embedded.train.teacher import cache_windows, cached_batches, make_topk_kd_loss_fn
from hedgerow.server.errors import HedgerowError

# The package's embedded dir (server/embedded), where the shipped pair lives.
EMBEDDED_DIR = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags (also those of ``hedgerow train-pair``)."""
    g = parser.add_argument_group("paths")
    g.add_argument("--work-dir", type=Path, default=Path("hedgerow-train-pair"),
                   help="checkpoints, tokenized corpus and logs; rerunning resumes from here")
    g.add_argument("--out-dir", type=Path, default=None,
                   help="where target/ and draft/ are written (required to train; default with --eval-only: "
                        "the shipped pair, read)")
    g.add_argument("--overwrite-embedded", action="store_true",
                   help="write the pair into the package's server/embedded, replacing the shipped pair")
    g.add_argument("--stdlib", type=Path, default=None,
                   help="corpus root (default: sysconfig stdlib of this interpreter)")
    g.add_argument("--max-files", type=int, default=0, help="debug: cap the number of corpus files; 0 = all")

    g = parser.add_argument_group("tokenizer")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary, the special token included")
    g.add_argument("--heldout-percent", type=float, default=2.0,
                   help="percent of files (by sha1 of relative path) held out for evaluation")

    g = parser.add_argument_group("target model")
    g.add_argument("--target-hidden", type=int, default=384, help="hidden size")
    g.add_argument("--target-layers", type=int, default=6, help="decoder layers")
    g.add_argument("--target-heads", type=int, default=6, help="attention heads")
    g.add_argument("--target-kv-heads", type=int, default=2, help="key/value heads (GQA)")
    g.add_argument("--target-intermediate", type=int, default=896, help="MLP intermediate size (SwiGLU)")
    g.add_argument("--target-lr", type=float, default=1.5e-3, help="peak learning rate")
    g.add_argument("--target-batch", type=int, default=8, help="sequences per optimizer step")
    g.add_argument("--target-minutes", type=float, default=34.0, help="training-loop time budget")
    g.add_argument("--target-steps", type=int, default=0, help="fix the step count (overrides minutes); 0 = by minutes")
    g.add_argument("--target-from", type=Path, default=None,
                   help="use this exported target (and its tokenizer) instead of training one; "
                        "only the draft is trained")

    g = parser.add_argument_group("greedy continuations of the target (draft training data)")
    g.add_argument("--greedy-minutes", type=float, default=10.0,
                   help="time spent generating them (0: train the draft on the corpus only)")
    g.add_argument("--greedy-rows", type=int, default=0, help="fix the number of rows (overrides minutes); 0 = by minutes")
    g.add_argument("--greedy-batch", type=int, default=128, help="rows generated together")
    g.add_argument("--greedy-prefix", type=int, default=64, help="tokens of the corpus each row starts from")
    g.add_argument("--greedy-new", type=int, default=193, help="greedy tokens generated per row")
    g.add_argument("--greedy-fraction", type=float, default=0.5,
                   help="fraction of each draft batch's rows taken from the greedy continuations")

    g = parser.add_argument_group("the target as the draft's teacher")
    g.add_argument("--teacher", choices=("cached", "online"), default="cached",
                   help="cached: the target's top-k distributions computed once on a pool of rows, the draft "
                        "trains epochs over it; online: a target pass on fresh windows every draft step")
    g.add_argument("--teacher-minutes", type=float, default=2.0,
                   help="cached: time spent on windows of the training stream (the greedy rows come too)")
    g.add_argument("--teacher-windows", type=int, default=0,
                   help="cached: fix the number of windows (overrides minutes); 0 = by minutes")
    g.add_argument("--teacher-topk", type=int, default=32, help="cached: the teacher's top tokens kept per position")

    g = parser.add_argument_group("draft model")
    g.add_argument("--draft-hidden", type=int, default=128, help="hidden size")
    g.add_argument("--draft-layers", type=int, default=4, help="decoder layers")
    g.add_argument("--draft-heads", type=int, default=4, help="attention heads")
    g.add_argument("--draft-kv-heads", type=int, default=2, help="key/value heads (GQA)")
    g.add_argument("--draft-intermediate", type=int, default=320, help="MLP intermediate size (SwiGLU)")
    g.add_argument("--draft-lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--draft-batch", type=int, default=8, help="sequences per optimizer step")
    g.add_argument("--draft-minutes", type=float, default=13.0, help="training-loop time budget")
    g.add_argument("--draft-steps", type=int, default=0, help="fix the step count (overrides minutes); 0 = by minutes")
    g.add_argument("--kd-alpha", type=float, default=0.9,
                   help="draft loss = alpha * KL(target||draft) + (1 - alpha) * CE")
    g.add_argument("--kd-temperature", type=float, default=1.0,
                   help="softmax temperature of the KL term (--teacher online only)")

    g = parser.add_argument_group("training")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay ends at this fraction of the peak")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on matrices only")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping")
    g.add_argument("--seed", type=int, default=1234, help="weights, windows and data order")
    g.add_argument("--threads", type=int, default=2, help="torch threads for training")
    g.add_argument("--no-adaptive-threads", action="store_true",
                   help="keep --threads fixed; by default the loop periodically tries 1 thread vs "
                        "--threads and keeps the faster (a shared box with other CPU load)")
    g.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast (bf16 only where the CPU has it natively: "
                   "float32 is used anyway where it has not)")
    g.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint interval (wall clock)")
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="debug: checkpoint and exit after this many optimizer steps in this process")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-only", action="store_true", help="only evaluate the pair in --out-dir (or the shipped pair)")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for loss/perplexity")
    g.add_argument("--num-prompts", type=int, default=20, help="HumanEval prompts (the first N)")
    g.add_argument("--gen-tokens", type=int, default=128, help="greedy target tokens per prompt")
    g.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per step of simulated speculation")
    g.add_argument("--eval-json", type=Path, default=None, help="also write the eval results here (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hedgerow train-pair",
        description="Train the embedded default target/draft pair on the Python stdlib.",
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m hedgerow.server.embedded.train``: ``hedgerow train-pair``, with its error handling."""
    from hedgerow.server.cli import main as hedgerow_main

    return hedgerow_main(["train-pair", *(sys.argv[1:] if argv is None else argv)])


def out_dir(args) -> Path:
    """Where the pair is written (with ``--eval-only``, read). The shipped pair is never written
    unless ``--overwrite-embedded`` says so: a training run would replace the models every user's
    first command runs."""
    given = None if args.out_dir is None else Path(args.out_dir).expanduser()
    if args.overwrite_embedded:
        if given is not None and given.resolve() != EMBEDDED_DIR:
            raise HedgerowError(f"--overwrite-embedded writes {EMBEDDED_DIR}: it takes no other --out-dir ({given})")
        return EMBEDDED_DIR
    if given is None:
        if args.eval_only:
            return EMBEDDED_DIR
        raise HedgerowError("train-pair needs --out-dir DIR, or --overwrite-embedded to replace the shipped pair "
                            f"in {EMBEDDED_DIR}")
    if given.resolve() == EMBEDDED_DIR and not args.eval_only:
        raise HedgerowError(f"--out-dir {given} is the shipped pair's folder: add --overwrite-embedded to replace it")
    return given


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def run(args) -> int:
    """Run the pipeline for parsed ``args`` (``--eval-only``: only stage 7); returns the exit status."""
    args.out_dir = out_dir(args)
    import numpy as np
    import torch

    from hedgerow.server.models.loader import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(max(1, args.threads))
    args.work_dir = Path(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(args.work_dir / "train_pair.log", "a", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    if not args.no_bf16 and not cpu_has_bf16():
        # emulated bf16 matrix products ran ~20x slower than float32 on such a CPU (AVX2 only):
        # a time-budgeted stage would get a twentieth of its steps
        log("this CPU has no native bf16 (AVX512-BF16 or AMX): training in float32, as --no-bf16")
        args.no_bf16 = True
    if args.teacher == "cached" and args.kd_temperature != 1.0:
        raise HedgerowError("--kd-temperature needs --teacher online: the cached teacher keeps distributions at "
                            "temperature 1")
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
    greedy_rows, greedy_pool = generate_greedy_rows(target, train_stream, eos, args, log)

    # 5. the teacher's distributions, kept
    if args.teacher == "cached":
        windows = cache_windows(target, train_stream, args, log)
        loss_fn = make_topk_kd_loss_fn(args.kd_alpha)
        batches = cached_batches(windows, greedy_pool, "draft", args.draft_batch, args)
    else:
        windows = None
        loss_fn = make_kd_loss_fn(target, args.kd_alpha, args.kd_temperature)
        batches = mixed_batches(train_stream, greedy_rows, "draft", args.draft_batch, args)

    # 6. draft (distilled from the target)
    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(llama_config(V, args.draft_hidden, args.draft_layers, args.draft_heads,
                                          args.draft_kv_heads, args.draft_intermediate, eos, max_pos))
    dc, tc = cost_per_token(draft), cost_per_token(target)
    log(f"[draft] {dc}; flops ratio draft/target = {dc['flops_per_token'] / tc['flops_per_token']:.4f}")
    dstate = train_stage(Stage("draft", draft, args.draft_lr, args.draft_batch, args.draft_minutes,
                               args.draft_steps, loss_fn, batches), args, log)

    # 7. export
    if args.target_from is None:
        export_model(target, hf_tok, args.out_dir / "target")
    elif (args.out_dir / "target").resolve() != args.target_from.resolve():
        shutil.copytree(args.target_from, args.out_dir / "target", dirs_exist_ok=True)
    export_model(draft, hf_tok, args.out_dir / "draft")
    size = sum(f.stat().st_size for d in ("target", "draft") for f in (args.out_dir / d).iterdir() if f.is_file())
    log(f"[export] wrote {args.out_dir}/target and /draft ({size / 1e6:.2f} MB)")

    meta["training"] = {
        # not the subcommand's handler that `hedgerow train-pair` sets as args.func
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)},
        "target": {k: tstate[k] for k in ("step", "total_steps", "elapsed_s", "warmup")},
        "draft": {k: dstate[k] for k in ("step", "total_steps", "elapsed_s", "warmup")},
        "target_last_losses": tstate["losses"][-5:],
        "draft_last_losses": dstate["losses"][-5:],
        "greedy_rows": 0 if greedy_rows is None else list(greedy_rows.shape),
        "teacher_windows": 0 if windows is None else list(windows["x"].shape),
        "export_bytes": size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"[done] training minutes: target {tstate['elapsed_s'] / 60:.1f}, draft {dstate['elapsed_s'] / 60:.1f};"
        f" this process {(time.time() - t_start) / 60:.1f} min")

    # 8. eval
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
