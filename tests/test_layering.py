"""Import directions, read from the source with ``ast`` (nothing is imported): the engine core
(hedgerow.server.engine, hedgerow.server.models) imports no gRPC, HTTP, Prometheus or Ray code, no edge
of the server and nothing of hedgerow.bench or hedgerow.server.embedded.train; hedgerow.drafting
imports nothing from hedgerow.server; hedgerow.verify imports nothing from hedgerow.drafting or
hedgerow.server; hedgerow.server.proxy reaches the server only through the gRPC stubs
(hedgerow.server.rpc), never the engine (hedgerow.server.errors, the user-facing error every
command shares, and hedgerow.server.aio, asyncio helpers, depend on nothing); and nothing outside
hedgerow.bench imports hedgerow.bench (the CLI names its subcommand modules as strings).

Every import statement counts, inside functions and ``TYPE_CHECKING`` blocks too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "drafting", "verify", "bench")  # repository folder = hedgerow.<folder>

SERVING_STACK = ("grpc", "grpc_*", "fastapi", "uvicorn", "starlette", "httpx", "prometheus_client", "ray",
                 "hedgerow.server.service", "hedgerow.server.proxy", "hedgerow.server.rpc", "hedgerow.server.scaleout")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: str  # its file, relative to the repository
    line: int
    statement: str
    target: str  # an imported module, absolute (``from a import b`` gives a and a.b: b may be a module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["hedgerow", *parts])


def imports_of(path: Path) -> list[Import]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = ([base] if node.module else []) + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [Import(name, rel, node.lineno, ast.unparse(node), t) for t in targets]
    return found


@cache
def all_imports() -> list[Import]:
    files = sorted(f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py") if "__pycache__" not in f.parts)
    return [i for f in files for i in imports_of(f)]


def within(module: str, prefixes) -> bool:
    """``module`` is one of ``prefixes`` or inside one; ``grpc_*`` stands for every top-level name
    starting with ``grpc_``."""
    for p in prefixes:
        if p.endswith("*"):
            if module.split(".")[0].startswith(p[:-1]):
                return True
        elif module == p or module.startswith(p + "."):
            return True
    return False


@dataclass(frozen=True)
class Rule:
    what: str
    importers: tuple[str, ...]  # modules the rule binds
    forbidden: tuple[str, ...]  # what they must not import
    allowed: tuple[str, ...] = ()  # exceptions inside ``forbidden``
    exempt: tuple[str, ...] = ()  # exceptions inside ``importers``

    def violations(self, imports: list[Import]) -> list[str]:
        seen, out = set(), []
        for i in imports:
            binds = within(i.module, self.importers) and not within(i.module, self.exempt)
            if (binds and within(i.target, self.forbidden) and not within(i.target, self.allowed)
                    and (i.path, i.line) not in seen):
                seen.add((i.path, i.line))
                out.append(f"{i.module} ({i.path}:{i.line}): {i.statement}")
        return out


RULES = {
    "engine core": Rule(
        "the engine core imports no serving stack, bench or trainer",
        ("hedgerow.server.engine", "hedgerow.server.models"),
        SERVING_STACK + ("hedgerow.bench", "hedgerow.server.embedded.train"),
    ),
    "drafting": Rule("hedgerow.drafting imports nothing from hedgerow.server", ("hedgerow.drafting",),
                     ("hedgerow.server",)),
    "verify": Rule("hedgerow.verify imports nothing from hedgerow.drafting or hedgerow.server", ("hedgerow.verify",),
                   ("hedgerow.drafting", "hedgerow.server")),
    "proxy": Rule(
        "hedgerow.server.proxy imports only itself and the gRPC stubs of Hedgerow",
        ("hedgerow.server.proxy",), ("hedgerow",),
        allowed=("hedgerow.server.proxy", "hedgerow.server.rpc", "hedgerow.server.errors", "hedgerow.server.aio"),
    ),
    "aio": Rule("hedgerow.server.aio, shared by the service and the proxy, imports nothing of Hedgerow",
                ("hedgerow.server.aio",), ("hedgerow",)),
    "bench": Rule("nothing outside hedgerow.bench imports it", ("hedgerow",), ("hedgerow.bench",),
                  exempt=("hedgerow.bench",)),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_directions(rule):
    bad = RULES[rule].violations(all_imports())
    assert not bad, f"{RULES[rule].what}:\n  " + "\n  ".join(bad)

