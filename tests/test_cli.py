"""``hedgerow generate``: output, JSON stats, and one clear line for every bad input."""

import json
import subprocess
import sys

import pytest

from hedgerow.server.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hedgerow.server.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_json_matches_plain_decoding(tiny_folders):
    common = ["generate", "--target", str(tiny_folders["target"]), "--prompt", "def fib", "--max-new-tokens", "12",
              "--json", "--ignore-eos"]
    spec = run_cli(*common, "--draft", str(tiny_folders["draft"]), "--mode", "chain", "--draft-tokens", "3",
                   "--adaptive", "none")  # the cost policy would (rightly) stop drafting with this random draft
    plain = run_cli(*common, "--mode", "plain")
    assert spec.returncode == 0, spec.stderr
    a, b = json.loads(spec.stdout.strip().splitlines()[-1]), json.loads(plain.stdout.strip().splitlines()[-1])
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 12
    assert a["finish_reason"] == "length"
    for key in ("verify_steps", "draft_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_length",
                "tokens_per_second"):
        assert key in a["stats"]
    assert a["stats"]["draft_tokens"] > 0 and b["stats"]["draft_tokens"] == 0
    assert a["text"] == b["text"]


@pytest.mark.engine
def test_generate_streams_text(tiny_folders, capsys):
    code = main(["generate", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]),
                 "--prompt", "import os", "--max-new-tokens", "8", "--ignore-eos"])
    assert code == 0
    assert capsys.readouterr().out.endswith("\n")


def _bad(tiny_folders):
    t, d, o = (str(tiny_folders[k]) for k in ("target", "draft", "other"))
    base = ["generate", "--target", t, "--draft", d]
    return {
        "empty prompt": (base + ["--prompt", ""], "--prompt is empty"),
        "zero max tokens": (base + ["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        "negative max tokens": (base + ["--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
        "negative temperature": (base + ["--prompt", "x", "--temperature", "-0.5"], "temperature"),
        "top-p zero": (base + ["--prompt", "x", "--top-p", "0"], "top-p"),
        "top-p above one": (base + ["--prompt", "x", "--top-p", "1.5"], "top-p"),
        "missing folder": (["generate", "--target", "/nonexistent/model", "--draft", d, "--prompt", "x"],
                           "/nonexistent/model"),
        "mismatched pair": (["generate", "--target", t, "--draft", o, "--prompt", "x"], "do not share a tokenizer"),
        "bad device": (base + ["--prompt", "x", "--target-device", "tpu"], "--target-device"),
        "no cuda": (base + ["--prompt", "x", "--target-device", "cuda:0"], "cuda"),
        "bad dtype": (base + ["--prompt", "x", "--dtype", "int8"], "--dtype"),
        "not a number": (base + ["--prompt", "x", "--temperature", "hot"], "temperature"),
        "chain without draft": (["generate", "--target", t, "--prompt", "x", "--mode", "chain"], "--draft"),
    }


@pytest.mark.unit
@pytest.mark.parametrize("case", [
    "empty prompt", "zero max tokens", "negative max tokens", "negative temperature", "top-p zero",
    "top-p above one", "missing folder", "mismatched pair", "bad device", "no cuda", "bad dtype", "not a number",
    "chain without draft",
])
def test_bad_input_exits_with_one_clear_line(tiny_folders, capsys, case):
    argv, needle = _bad(tiny_folders)[case]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("hedgerow: error:"), err
    assert needle in err


@pytest.mark.live
def test_bad_input_in_a_real_process_has_no_traceback(tiny_folders):
    proc = run_cli("generate", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["other"]),
                   "--prompt", "x")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()  # progress lines ("hedgerow: loading ..."), then the error
    assert all(line.startswith("hedgerow: ") for line in lines), proc.stderr
    assert [line for line in lines if line.startswith("hedgerow: error: ")] == lines[-1:]


@pytest.mark.live
@pytest.mark.parametrize("compiling", [False, True])
def test_the_command_ends_at_once_while_a_background_compile_runs(compiling):
    """With a background compile still running, the command ends with os._exit (the interpreter is
    not finalised around the compiler's thread: that could abort the process), its output flushed
    and its status kept; otherwise it exits normally (atexit handlers run)."""
    code = (
        "import atexit, sys, time\n"
        "from hedgerow.server.engine import fast_pass\n"
        "from hedgerow.server.cli import entry\n"
        "atexit.register(lambda: print('finalised', flush=True))\n"
        f"if {compiling}: fast_pass.start_background(lambda: time.sleep(60), 'compile')\n"
        "sys.argv = ['hedgerow', 'generate', '--max-new-tokens', '0']\n"
        "entry()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "hedgerow: error:" in proc.stderr, proc.stderr
    assert ("finalised" in proc.stdout) is not compiling
