"""The pair's training text: the Python standard library, its held-out split, the tokenizer, the token streams.

The corpus is every ``.py`` file under the running interpreter's stdlib (tests,
site-packages, generated codec tables and pydoc topic dumps excluded); a file is
held out by hash of its relative path, so the split is deterministic and does not
depend on file contents. The tokenizer is a byte-level BPE trained with
``tokenizers``; ``<|endoftext|>`` is bos/eos/pad and separates documents.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"

# Directory names that are never part of the corpus.
EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",  # one 750 KB string of prose (pydoc topics)
    "config-3.11-x86_64-linux-gnu",
}


def stdlib_root(args) -> Path:
    return Path(args.stdlib) if args.stdlib else Path(sysconfig.get_paths()["stdlib"])


def _is_generated_codec(text: str) -> bool:
    return "gencodec.py" in text[:2000]


def collect_corpus(root: Path, heldout_percent: float, max_files: int = 0):
    """Return (train_docs, heldout_docs, stats); docs are (relpath, text) sorted by path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                files.append(rel_dir / fn)
    files.sort(key=lambda p: p.as_posix())
    if max_files:
        files = files[:max_files]
    train, held = [], []
    n_bytes = 0
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or _is_generated_codec(text):
            continue
        n_bytes += len(text.encode("utf-8"))
        key = rel.as_posix()
        bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10000
        (held if bucket < heldout_percent * 100 else train).append((key, text))
    if not held and len(train) > 1:  # tiny debug corpora: always hold out one file
        held.append(train.pop())
    stats = {
        "root": str(root),
        "files_train": len(train),
        "files_heldout": len(held),
        "bytes": n_bytes,
        "bytes_heldout": sum(len(t.encode("utf-8")) for _, t in held),
    }
    return train, held, stats


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_docs(hf_tok, docs) -> "list[int]":
    """Concatenate documents, each followed by eos (eos is the document separator)."""
    eos = hf_tok.eos_token_id
    ids: list[int] = [eos]
    texts = [t for _, t in docs]
    for i in range(0, len(texts), 64):
        for enc in hf_tok(texts[i:i + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eos)
    return ids
