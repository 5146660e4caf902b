"""Folders read without transformers (server/models/light.py) give what transformers gives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hedgerow.server.models.light import LightTokenizer, generation_defaults, light_config, light_tokenizer
from hedgerow.server.models.native.config import native_config

EMBEDDED = Path(__file__).resolve().parents[1] / "server" / "embedded"
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "  leading and trailing spaces  ",
    "\t\ttabs\nand\r\nnewlines\n\n\n",
    "unicode: héllo wörld — 日本語 🎉 \u200b",
    "<|endoftext|>special in the middle<|endoftext|>",
    "",
    "x" * 300,
]


def _folders(tiny_folders):
    return [EMBEDDED / "target", EMBEDDED / "draft", tiny_folders["target"]]


@pytest.mark.unit
@pytest.mark.parametrize("which", [0, 1, 2])
def test_the_light_tokenizer_encodes_and_decodes_as_transformers_does(tiny_folders, which):
    from transformers import AutoTokenizer

    folder = _folders(tiny_folders)[which]
    light, full = light_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert isinstance(light, LightTokenizer), f"{folder} should read without transformers"
    for text in TEXTS:
        ids = full.encode(text)
        assert light.encode(text) == ids, text
        for skip in (False, True):
            assert light.decode(ids, skip_special_tokens=skip) == full.decode(ids, skip_special_tokens=skip)
    every = list(range(len(full)))
    assert light.decode(every) == full.decode(every)
    assert light.get_vocab() == full.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(light, name) == getattr(full, name), name
    if full.chat_template:
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
        for tokenize in (False, True):
            assert light.apply_chat_template(chat, tokenize=tokenize, add_generation_prompt=True) == \
                full.apply_chat_template(chat, tokenize=tokenize, add_generation_prompt=True)


@pytest.mark.unit
@pytest.mark.parametrize("which", [0, 1, 2])
def test_the_light_config_is_the_native_config_transformers_gives(tiny_folders, which):
    from transformers import AutoConfig, GenerationConfig

    folder = _folders(tiny_folders)[which]
    raw = light_config(folder)
    assert raw is not None
    assert native_config(raw) == native_config(AutoConfig.from_pretrained(folder))
    defaults = generation_defaults(folder)
    if (folder / "generation_config.json").is_file():
        assert defaults.eos_token_id == GenerationConfig.from_pretrained(folder).eos_token_id
    else:
        assert defaults is None


@pytest.mark.unit
@pytest.mark.parametrize(
    "file,change",
    [
        ("tokenizer_config.json", {"add_bos_token": True}),  # transformers rewrites the post-processor
        ("tokenizer_config.json", {"clean_up_tokenization_spaces": True}),
        ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizerFast"}),
        ("config.json", {"rope_theta": 500000.0}),  # a legacy key transformers converts
        ("config.json", {"model_type": "qwen2"}),
    ],
)
def test_what_transformers_would_change_goes_through_transformers(tmp_path, file, change):
    folder = tmp_path / "m"
    shutil.copytree(EMBEDDED / "target", folder)
    data = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**data, **change}))
    got = light_tokenizer(folder) if file.startswith("tokenizer") else light_config(folder)
    assert got is None


@pytest.mark.unit
def test_a_missing_config_field_goes_through_transformers(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(EMBEDDED / "target", folder)
    data = json.loads((folder / "config.json").read_text())
    del data["head_dim"]
    (folder / "config.json").write_text(json.dumps(data))
    assert light_config(folder) is None


@pytest.mark.unit
def test_the_embedded_pair_loads_without_importing_transformers():
    code = (
        "import sys\n"
        "from hedgerow.server.models.loader import load_pair\n"
        "p = load_pair('target', 'draft')\n"
        "assert type(p.tokenizer).__name__ == 'LightTokenizer'\n"
        "assert p.target.generation_config.eos_token_id == 0\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=EMBEDDED, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
