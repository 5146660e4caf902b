"""Secrets on the command lines of ``hedgerow proxy`` and ``hedgerow serve``: the API key and TLS.

A key given as ``--api-key KEY`` is in the process's arguments, which every user of the machine can
read (``ps``): the flag works, but ``$HEDGEROW_API_KEY`` or ``--api-key-file`` (the file's first
line) keep it out of sight. A flag wins over the environment. Both commands read the same variable,
so one secret in one place protects the proxy and the gRPC server behind it. Nothing here imports
more than the standard library: ``hedgerow`` builds its parser from these functions.
"""

from __future__ import annotations

import argparse
import hmac
import os
from pathlib import Path

from hedgerow.server.errors import HedgerowError

ENV = "HEDGEROW_API_KEY"


def bearer_matches(header: str | None, key: str) -> bool:
    """Whether an ``Authorization`` value is ``Bearer KEY`` (the scheme in any case), compared in
    constant time."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def add_key_args(g, what: str) -> None:
    """``--api-key`` and ``--api-key-file``; ``what``: the calls that need the key."""
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on {what}; visible to every user of the machine in "
                   f"`ps`: prefer ${ENV} or --api-key-file (default: ${ENV}; unset = no key)")
    g.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the API key from the first line of FILE instead")


def read_key_file(path: str, flag: str) -> str:
    """The first line of a key file, which must not be empty."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise HedgerowError(f"{flag} {path}: {exc.strerror or exc}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise HedgerowError(f"{flag} {path}: the first line is empty")
    return key


def api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file``, ``--api-key`` or ``$HEDGEROW_API_KEY``, in that order; None: no key."""
    if args.api_key_file is not None and args.api_key is not None:
        raise HedgerowError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        return read_key_file(args.api_key_file, "--api-key-file")
    key = args.api_key if args.api_key is not None else os.environ.get(ENV)
    if key is not None and not key.strip():
        raise HedgerowError("--api-key is empty" if args.api_key is not None else f"${ENV} is set but empty")
    return key.strip() if key is not None else None


def add_tls_args(g, what: str) -> None:
    g.add_argument("--tls-cert", default=None, metavar="PEM",
                   help=f"serve {what} over TLS with this certificate chain (with --tls-key; default: no TLS)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")


def tls_files(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """(certificate, key) when TLS is asked for, both files checked to be readable PEM."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise HedgerowError("--tls-cert and --tls-key go together")
    if args.tls_cert is None:
        return None
    paths = []
    for flag, name in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        path = Path(name).expanduser()
        paths.append(path)
        read_pem(path, flag)
    return paths[0], paths[1]


def read_pem(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HedgerowError(f"{flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise HedgerowError(f"{flag} {path}: not a PEM file")
    return data
