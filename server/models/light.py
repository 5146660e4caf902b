"""A model folder read without importing transformers, where that is exact.

Importing transformers costs more than a second of start-up on a small CPU, most of the time to
first token for a small pair. For the folders whose tokenizer and config transformers itself only
passes through, Hedgerow reads them directly:

- the tokenizer, when ``tokenizer_config.json`` names a class that is only the ``tokenizers``
  library behind transformers' interface (``TokenizersBackend``, ``PreTrainedTokenizerFast``),
  ``tokenizer.json`` is there, and nothing in the config asks transformers to rewrite it at load
  (``add_bos_token``, ``add_eos_token``, space clean-up on decode);
- the config, when it is a Llama config saved by a transformers that writes ``rope_parameters``
  (so no legacy key needs converting) and names every field the native model reads;
- the stop tokens of ``generation_config.json``.

Anything else goes through transformers as before (server/models/loader.py). The embedded pair
reads this way; tests check both ways give the same tokens, text and native config.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer_config keys under which transformers changes what the tokenizer.json alone does
_REWRITING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")
# every field native_config reads from a Llama config without a default of its own
_LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
    "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "head_dim",
)


def _json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class LightTokenizer:
    """The part of transformers' tokenizer interface Hedgerow uses (encode, decode, the vocabulary,
    special tokens), over a ``tokenizers.Tokenizer``. A chat template is rendered by transformers'
    own tokenizer, loaded on first use: templates are Jinja with transformers' extensions, and
    rendering them any other way could differ."""

    def __init__(self, folder: Path, config: dict):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.name_or_path = str(folder)
        self.chat_template = config.get("chat_template")
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            setattr(self, name, _token_text(config.get(name)))
        self._full = None  # transformers' tokenizer, for chat templates only

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, *args, **kwargs):
        if self._full is None:
            from transformers import AutoTokenizer

            self._full = AutoTokenizer.from_pretrained(self.name_or_path)
        return self._full.apply_chat_template(*args, **kwargs)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _light_tokenizer_config(folder: Path) -> dict | None:
    config = _json(folder / "tokenizer_config.json")
    if config is None or not (folder / "tokenizer.json").is_file():
        return None
    if config.get("tokenizer_class") not in TOKENIZER_CLASSES:
        return None
    # transformers (>= 5, as pyproject requires) cleans up spaces on decode only when told to
    if config.get("clean_up_tokenization_spaces", False) is not False or any(k in config for k in _REWRITING_KEYS):
        return None
    return config


def light_tokenizer(folder: Path) -> LightTokenizer | None:
    """The folder's tokenizer without transformers, or None where that would not be exact."""
    config = _light_tokenizer_config(folder)
    return None if config is None else LightTokenizer(folder, config)


def reads_light(path: str) -> bool:
    """Whether the model at ``path`` (a folder or a hub id) loads natively without transformers."""
    folder = Path(path).expanduser()
    return folder.is_dir() and _light_tokenizer_config(folder) is not None and light_config(folder) is not None


def light_config(folder: Path) -> SimpleNamespace | None:
    """A Llama config.json as the attributes native_config reads, or None where transformers has
    to fill in or convert something."""
    config = _json(folder / "config.json")
    if config is None or config.get("model_type") != "llama" or "rope_theta" in config or "rope_scaling" in config:
        return None
    if any(k not in config for k in _LLAMA_FIELDS) or not isinstance(config["rope_parameters"], dict):
        return None
    return SimpleNamespace(**config)


def generation_defaults(folder: Path) -> SimpleNamespace | None:
    """generation_config.json's stop tokens (``eos_token_id``: an id or a list), None if absent."""
    config = _json(folder / "generation_config.json")
    if config is None:
        return None
    return SimpleNamespace(eos_token_id=config.get("eos_token_id"))
