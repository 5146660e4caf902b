"""Write a draft that cannot help: the embedded draft's architecture and tokenizer, random weights.

    python -m hedgerow.bench.random_draft /tmp/random-draft [--like server/embedded/draft] [--seed 0]

The "cost never slower" benchmark runs the engine with this draft: it proposes tokens of the right
vocabulary that the target almost never accepts, so every drafted token is wasted work and a good
policy has to fall back to plain decoding.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from hedgerow.server.embedded import default_pair

    parser = argparse.ArgumentParser(prog="python -m hedgerow.bench.random_draft", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (Hugging Face format)")
    parser.add_argument("--like", type=Path, default=None, help="model folder whose config and tokenizer to copy "
                        "(default: the embedded draft)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    like = args.like or Path(default_pair()[1])
    if not (like / "config.json").exists():
        parser.error(f"--like {like}: no config.json there")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in like.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy2(f, args.out / f.name)
    print(f"wrote a random-weight copy of {like} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
