"""``python -m hedgerow.server.embedded.train``: the pair trainer's command line (see ``cli``)."""

from hedgerow.server.embedded.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
