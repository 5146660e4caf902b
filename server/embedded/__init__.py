"""The embedded default model pair (see MODEL_CARD.md; trained by ``hedgerow.server.embedded.train``)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# The pair's chat template (in both tokenizer_config.json files; the trainer writes it on export).
# The pair completes Python code, it was never taught to converse: a chat is rendered as a Python
# file it can continue. System and user turns become comment lines (``# user: ...``, every line of
# the message commented), an assistant turn is ``# assistant:`` followed by its text as code, and
# the generation prompt is ``# assistant:`` and a newline. MODEL_CARD.md, "Chat".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "# assistant:\n{{ message['content'] }}\n"
    "{% else %}"
    "# {{ message['role'] }}: {{ message['content'] | replace('\\n', '\\n# ') }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}# assistant:\n{% endif %}"
)


def default_pair() -> tuple[str, str]:
    """Absolute paths of the shipped (target, draft) Hugging Face model folders."""
    return str(_HERE / "target"), str(_HERE / "draft")
