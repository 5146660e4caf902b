"""``hedgerow`` command line: generate, serve, proxy, train-pair, bench.

Every user error ends with one line ``hedgerow: error: ...`` and exit status 2, never a traceback.
What can be checked without torch is checked first, while the flags are parsed (ranges, --dtype
names, device syntax) and then before any model loads (that the model folders or Hugging Face ids
exist), so a mistake costs well under a second.

This module is the entry point: the parser, its one-line errors and the dispatch to a subcommand.
The shared flags are in ``cli_args``, the models and engine they build in ``cli_models``, and each
subcommand in a module of its own (``SUBCOMMANDS``). The names other modules use from those are
importable from here too.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from hedgerow.server.cli_args import (DEFAULT_CPU_THREADS, DTYPE_NAMES, add_cpu_threads_arg, add_model_args,
                                      add_sampling_args, add_spec_args, apply_cpu_threads, device_name,
                                      int_at_least, spec_size)
from hedgerow.server.cli_models import (_looks_local, build_engine, check_hub_id, check_model_source, eos_ids,
                                        hub_unreachable, resolve_models, sampling_from_args,
                                        spec_from_args)
from hedgerow.server.errors import HedgerowError

__all__ = [
    "DEFAULT_CPU_THREADS", "DTYPE_NAMES", "HedgerowError", "add_cpu_threads_arg", "add_model_args",
    "add_sampling_args", "add_spec_args", "apply_cpu_threads", "build_engine", "build_parser", "check_hub_id",
    "check_model_source", "device_name", "eos_ids", "hub_unreachable", "int_at_least", "main",
    "resolve_models", "sampling_from_args", "spec_from_args", "spec_size",
    "_looks_local",  # the loader's rule, restated without torch (tests/test_first_hour.py compares them)
]

# Subcommands living in their own modules: each has ``add_arguments(parser)`` and ``run(args)``,
# and its docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "generate": "hedgerow.server.cli_generate",
    "serve": "hedgerow.server.service.serve",
    "proxy": "hedgerow.server.proxy.cli",
    "train-pair": "hedgerow.server.embedded.train.cli",
    "bench": "hedgerow.bench.cli",
}


class HelpFormatter(argparse.HelpFormatter):
    """Every optional flag's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            default = "on" if action.default else "off"
        elif action.default is None:
            default = "none"
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".lstrip()


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an error is one line, prefixed by the subcommand it concerns."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, no usage dump
        where = self.prog.removeprefix("hedgerow").strip()  # "" at the top, "generate", "bench offline"
        raise HedgerowError(f"{where}: {message}" if where else message)


class _CommandParser(_Parser):
    """A subcommand's parser: a flag it does not know is its error, named after it (argparse would
    hand it up to the top-level parser, whose message names no subcommand)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The command line. ``commands``: the subcommands whose flags are added (default: all); the
    others are listed but their modules are not imported, so that a command's mistake is reported
    without waiting for another command's imports (torch, for some)."""
    parser = _Parser(prog="hedgerow", description="Speculative-decoding inference server. "
                     "`hedgerow COMMAND --help` lists a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=_summary(module))
        if commands is None or name in commands:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
            if name == "serve":  # hedgerow serve --ray: replicas on Ray Serve (server/scaleout)
                from hedgerow.server.scaleout.cli import add_ray_arguments, run_serve

                add_ray_arguments(p)
                p.set_defaults(func=run_serve)
    return parser


def _summary(module: str) -> str:
    """The first line of a subcommand module's docstring, read from its source without importing it."""
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)).strip().splitlines()[0]


def setup_logging() -> None:
    """Hedgerow's own log lines (which model implementation, compile timings, request failures)
    on stderr, one line each; other libraries keep their own settings."""
    log = logging.getLogger("hedgerow")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("hedgerow: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging()
    try:
        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser(commands=[word for word in argv[:1] if not word.startswith("-")])
        args = parser.parse_args(argv)
        if args.command is None:  # bare `hedgerow`: what it can do
            parser.print_help()
            return 0
        return args.func(args)
    except HedgerowError as exc:
        print(f"hedgerow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``hedgerow`` command: ``main``, then the end of the process. A background compile
    (``--compile auto``) that is still running is a daemon thread inside torch's compiler, and
    finalising the interpreter around it can abort the process (SIGABRT, "terminate called without
    an active exception") after a clean stop; so then the process ends at once with ``os._exit``,
    its output flushed and its exit status kept. Only the command does this: ``main`` returns, for
    callers in a process of their own."""
    status = main()
    fast_pass = sys.modules.get("hedgerow.server.engine.fast_pass")  # never imported just to ask
    if fast_pass is not None and fast_pass.compiling():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
