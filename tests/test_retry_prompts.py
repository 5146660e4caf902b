"""The humaneval-retry prompt set: its first answers are what the embedded target writes
(bench/retry_answers.py), and each prompt asks the task twice with the first answer between."""

import json

import pytest

from hedgerow.bench.prompts import RETRY_ASK, load_prompts
from hedgerow.bench.retry_answers import COUNT, DATA, answers, tasks


@pytest.mark.unit
def test_a_retry_prompt_is_the_task_its_first_answer_and_the_task_again():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    prompts = load_prompts("humaneval-retry")
    assert len(rows) == len(prompts) == COUNT
    for task, row, prompt in zip(tasks(), rows, prompts):
        assert row["task_id"] == task["task_id"] and row["answer"].strip()
        assert prompt == task["prompt"] + row["answer"] + RETRY_ASK + task["prompt"]


@pytest.mark.slow
def test_the_first_answers_are_what_the_embedded_target_writes():
    """The file is current (python -m hedgerow.bench.retry_answers); the first two answers are
    regenerated here, greedy and deterministic."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert answers(2) == rows[:2]
