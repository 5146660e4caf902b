"""Write a draft that cannot help: the embedded draft's architecture and tokenizer, random weights.

    python -m hedgerow.bench.random_draft /tmp/random-draft [--like server/embedded/draft] [--seed 0] \
        [--shape LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE]

The "cost never slower" benchmark runs the engine with this draft: it proposes tokens of the right
vocabulary that the target almost never accepts, so every drafted token is wasted work and a good
policy has to fall back to plain decoding. With ``--shape`` the copy takes another size (the
vocabulary, tokenizer and the rest of the config kept): what a draft of that shape costs, measured
before anyone trains one (``hedgerow bench drafts``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MARKER = "hedgerow_random_draft.json"  # how the folder was made (``hedgerow bench drafts`` reads it)


def main(argv: list[str] | None = None) -> int:
    from hedgerow.server.embedded import default_pair

    parser = argparse.ArgumentParser(prog="python -m hedgerow.bench.random_draft", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (Hugging Face format)")
    parser.add_argument("--like", type=Path, default=None, help="model folder whose config and tokenizer to copy "
                        "(default: the embedded draft)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default=None, metavar="L:H:HEADS:KV:I",
                        help="layers, hidden size, attention heads, KV heads, MLP intermediate size (default: --like's)")
    args = parser.parse_args(argv)
    sizes = None
    if args.shape is not None:
        try:
            sizes = [int(x) for x in args.shape.split(":")]
        except ValueError:
            sizes = []
        if len(sizes) != 5 or min(sizes) < 1 or sizes[1] % sizes[2] or sizes[2] % sizes[3]:
            parser.error(f"--shape {args.shape}: want LAYERS:HIDDEN:HEADS:KV_HEADS:INTERMEDIATE, positive integers, "
                         "HIDDEN a multiple of HEADS and HEADS of KV_HEADS")
    like = args.like or Path(default_pair()[1])
    if not (like / "config.json").exists():
        parser.error(f"--like {like}: no config.json there")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(like)
    if sizes is not None:
        layers, hidden, heads, kv, inter = sizes
        config.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                       "num_key_value_heads": kv, "intermediate_size": inter, "head_dim": hidden // heads})
    model = AutoModelForCausalLM.from_config(config)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in like.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy2(f, args.out / f.name)
    made = "python -m hedgerow.bench.random_draft " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / MARKER).write_text(json.dumps({"random_weights": True, "command": made}) + "\n")
    print(f"wrote a random-weight copy of {like} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
