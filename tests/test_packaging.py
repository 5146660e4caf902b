"""The distribution: pyproject.toml lists every package folder under its ``hedgerow.`` name, and the
wheel holds ``hedgerow`` alone, with its data (kernel sources, the embedded pair, the stubs' type
files), and works installed into a folder of its own, away from the repository.

The wheel is built from a copy of what the build reads (pyproject.toml, README.md, the folders of
``package-dir``): an in-tree build would leave build/ in the repository, whose stale files a later
build would pack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("server", "drafting", "verify", "bench")
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def folder_of(package: str) -> Path:
    """Where ``package`` lives in the repository, by ``package-dir``'s longest matching prefix."""
    dirs = SETUPTOOLS["package-dir"]
    prefix = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
    return ROOT / dirs[prefix] / Path(*package[len(prefix):].split(".")[1:])


@pytest.mark.unit
def test_every_package_folder_is_listed_and_every_listed_package_is_there():
    listed = set(SETUPTOOLS["packages"])
    on_disk = {".".join(("hedgerow", *init.parent.relative_to(ROOT).parts))
               for top in PACKAGE_FOLDERS for init in (ROOT / top).rglob("__init__.py")}
    assert not on_disk - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    missing = sorted(p for p in listed if not folder_of(p).is_dir())
    assert not missing, f"[tool.setuptools] packages lists packages with no folder: {missing}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("hedgerow-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_hedgerow_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"hedgerow"}, sorted(top)
    data = ["hedgerow/cuda/tree_attention.cu", "hedgerow/server/embedded/MODEL_CARD.md"]
    for role in ("target", "draft"):
        data += [f"hedgerow/server/embedded/{role}/{f.name}" for f in (ROOT / "server" / "embedded" / role).iterdir()]
    data += [f"hedgerow/server/rpc/{f.name}" for f in (ROOT / "server" / "rpc").glob("*.pyi")]
    assert any(name.endswith(".pyi") for name in data)
    missing = sorted(set(data) - names)
    assert not missing, f"the wheel lacks {missing}"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("installed")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def run_installed(installed: Path, tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    """Python in ``tmp_path`` with the installed folder first on sys.path (PYTHONPATH, after the
    working directory): this environment's site-packages come after it, for the dependencies, and so
    does the repository's editable install, whose finder setuptools appends to sys.meta_path."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HEDGEROW_"))},
           "PYTHONPATH": str(installed), **env}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


WHERE = """
import importlib, json, sys
import hedgerow.server.cli
from hedgerow.server.models.kernels import compile as kc
found = {}
for name in ("server", "drafting", "verify", "bench"):
    try:
        found[name] = importlib.import_module(name).__file__
    except ModuleNotFoundError:
        found[name] = None
print(json.dumps({"cli": hedgerow.server.cli.__file__, "sources": str(kc._source_dir()), "folders": found,
                  "path": sys.path}))
"""


@pytest.mark.slow
def test_the_installed_wheel_is_hedgerow_alone(installed, tmp_path):
    done = run_installed(installed, tmp_path, "-c", WHERE)
    assert done.returncode == 0, done.stderr
    where = json.loads(done.stdout)
    assert [p for p in where["path"] if p not in ("", str(tmp_path))][0] == str(installed), where["path"]
    assert str(ROOT) not in where["path"]
    assert Path(where["cli"]).is_relative_to(installed), where["cli"]
    assert where["folders"] == dict.fromkeys(PACKAGE_FOLDERS), "importable outside the repository"
    assert Path(where["sources"]) == installed / "hedgerow" / "cuda"


COMPILE = """
import sys
try:
    from cuda.bindings import nvrtc
    assert int(nvrtc.nvrtcVersion()[0]) == 0
except Exception as e:
    print(f"no NVRTC: {e}")
    sys.exit(0)
from hedgerow.server.models.kernels import compile_kernels
cubins = compile_kernels("sm_90")
assert all(c[:4] == b"\\x7fELF" for c in cubins.values()), "not cubins"
print("compiled")
"""


@pytest.mark.slow
def test_the_installed_wheel_compiles_its_kernels(installed, tmp_path):
    cache = tmp_path / "kernel-cache"
    done = run_installed(installed, tmp_path, "-c", COMPILE, HEDGEROW_KERNEL_CACHE=str(cache))
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("no NVRTC"):
        pytest.skip(f"cuda-python's NVRTC is not loadable here ({done.stdout.strip()}): "
                    'pip install cuda-python "cuda-toolkit[nvrtc]==13.*"')
    assert done.stdout.strip() == "compiled"
    assert [p.suffix for p in (cache / "sm_90").iterdir()] == [".cubin"]  # compiled now, from the wheel's source


@pytest.mark.slow
def test_the_installed_cli_runs(installed, tmp_path):
    done = run_installed(installed, tmp_path, "-m", "hedgerow.server.cli", "generate", "--attention-backend", "cuda",
                         "--help")
    assert done.returncode == 0, done.stderr
    assert "--attention-backend" in done.stdout
