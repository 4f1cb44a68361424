"""What a user gets from `pip install .` (not editable): every subpackage,
the C sources of bpf/ as package data, and a CLI that works from any
directory, with no path into the source tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _declared() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["packages"]


def test_every_package_of_the_tree_is_declared():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "nfactor_xdp").rglob("__init__.py")}
    found |= {"nfs", "nfactor_xdp.bpf"}
    assert sorted(found) == sorted(_declared())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds
    src = tmp_path_factory.mktemp("src") / "nfactor-xdp"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                             "__pycache__", "bench-*.json"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                   check=True, cwd=out, capture_output=True)
    (whl,) = out.glob("nfactor_xdp-*.whl")
    return whl


def test_the_wheel_carries_the_c_sources_and_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in (REPO / "bpf").iterdir():
        if src.suffix in (".c", ".h"):
            assert f"nfactor_xdp/bpf/{src.name}" in names, src.name
    for pkg in _declared():
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, pkg
    assert not any(n.startswith(("tests/", "bpf/")) for n in names)


@pytest.mark.root
def test_an_installed_copy_runs_from_another_directory(wheel, tmp_path):
    """Installed into a fresh venv on the system Python (the one BCC is built
    for), run from a directory far from the checkout."""
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([venv / "bin/pip", "install", "-q", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    r = subprocess.run([venv / "bin/nfactorctl", "--help"], **run)
    assert r.returncode == 0 and "Exit codes" in r.stdout, r.stderr
    r = subprocess.run([venv / "bin/nfactorctl", "probe", "--json"], **run)
    assert r.returncode == 0, r.stdout + r.stderr  # every check ok, BPF compiled from the installed sources
    r = subprocess.run([venv / "bin/python", "-c", "import nfactor_xdp.kern.layouts as L; print(L.BPF_DIR)"], **run)
    assert r.stdout.strip().startswith(str(venv)), r.stdout
