"""The first answers of the ``humaneval-retry`` prompt set (bench/prompts.py), made by the embedded
target: ``bench/data/humaneval_retry.jsonl`` holds, for the first ``COUNT`` HumanEval tasks, the
target's greedy continuation of the task's prompt (``ANSWER_TOKENS`` tokens at most, stopped at
EOS). A retry prompt is that prompt, its first answer, a line asking for the task once more, and the
prompt again: the case of a user who asks again with the earlier answer in the context, where the
answer is largely a copy of text the model has seen (what n-gram lookup speeds up).

Regenerate (deterministic: greedy, float32, CPU):

    python -m hedgerow.bench.retry_answers

tests/test_retry_prompts.py checks that the file is what this command writes.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

COUNT = 20
ANSWER_TOKENS = 128
DATA = Path(__file__).resolve().parent / "data" / "humaneval_retry.jsonl"


def tasks(count: int = COUNT) -> list[dict]:
    from hedgerow.bench.prompts import _jsonl, _package_file

    rows = _jsonl(gzip.decompress(_package_file("humaneval").read_bytes()).decode(), "HumanEval.jsonl.gz")
    return rows[:count]


def answers(count: int = COUNT) -> list[dict]:
    """``{"task_id", "answer"}`` for the first ``count`` tasks, by the embedded target alone."""
    import torch

    from hedgerow.drafting.spec import SpecMode, SpecParams
    from hedgerow.server.embedded import default_pair
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.engine.sequence import Request
    from hedgerow.server.models.loader import load_pair

    torch.manual_seed(0)
    pair = load_pair(default_pair()[0], None, dtype="float32", max_len=1024)
    runner = ModelRunner(pair.target, num_slots=1, max_len=1024, name="target")
    eos = {pair.tokenizer.eos_token_id}
    engine = Engine(runner, None, eos_token_ids=eos,
                    config=EngineConfig(max_model_len=1024, spec=SpecParams(mode=SpecMode.PLAIN), adaptive="none"))
    out = []
    for task in tasks(count):
        ids = pair.tokenizer.encode(task["prompt"])
        seq = engine.generate([Request(task["task_id"], ids, max_new_tokens=ANSWER_TOKENS)])[task["task_id"]]
        out.append({"task_id": task["task_id"], "answer": pair.tokenizer.decode(seq.generated, skip_special_tokens=True)})
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    DATA.parent.mkdir(parents=True, exist_ok=True)
    DATA.write_text(render(answers()))
    print(f"wrote {DATA}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
