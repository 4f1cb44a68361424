"""The package's layers: imports run downward only.

    cli -> tools -> control -> (nfs) -> dataplane -> formats -> kern -> base

base is nfactor_xdp/__init__.py, errors.py, logs.py and nfactor_xdp.bpf (C
sources, installed as package data).  A module may import its own layer and any
layer below, never one above.  The built-in NFs in nfs/ sit just above the
dataplane: they may import nfactor_xdp.dataplane and below; the package loads
them by name (nf.load_modules), so only control and above could import them.

Every import counts: at module level and inside functions, absolute and
relative.  The modules are parsed with `ast`, never imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# bottom first
LAYERS = ("base", "kern", "formats", "dataplane", "nfs", "control", "tools", "cli")
BASE = ("nfactor_xdp", "nfactor_xdp.errors", "nfactor_xdp.logs", "nfactor_xdp.bpf")

# package -> its directory in the checkout (bpf/ is installed as nfactor_xdp.bpf)
SOURCES = {"nfactor_xdp": REPO / "nfactor_xdp", "nfactor_xdp.bpf": REPO / "bpf", "nfs": REPO / "nfs"}


class Module:
    def __init__(self, name: str, path: Path, is_package: bool):
        self.name, self.path, self.is_package = name, path, is_package

    @property
    def package(self) -> str:
        """What relative imports are relative to."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def where(self) -> Path:
        return self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path


def find_modules() -> dict[str, Module]:
    found = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join((package, *parts))
            found[name] = Module(name, path, is_package)
    return found


MODULES = find_modules()


def layer_of(name: str) -> str | None:
    """The layer of a module of ours, "?" for one outside every layer, None for
    anything else (the standard library, third-party packages)."""
    top, _, rest = name.partition(".")
    if top == "nfs":
        return "nfs"
    if top != "nfactor_xdp":
        return None
    if name in BASE or name.startswith("nfactor_xdp.bpf."):
        return "base"
    sub = rest.partition(".")[0]
    return sub if sub in LAYERS else "?"


def imports(mod: Module):
    """(line, imported module) for every import statement anywhere in `mod`.
    `from a import b` imports module a.b when there is one, else module a."""
    tree = ast.parse(mod.path.read_text(), str(mod.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = mod.package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else source


def upward_imports(importers) -> list[str]:
    bad = set()
    for mod in importers:
        if layer_of(mod.name) not in LAYERS:
            continue  # test_every_layer_is_found_and_every_module_has_one reports it
        mine = LAYERS.index(layer_of(mod.name))
        for line, target in imports(mod):
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs == "?" or LAYERS.index(theirs) > mine:
                bad.add(f"{mod.name} -> {target}    ({mod.where}:{line}, "
                        f"{layer_of(mod.name)} imports {theirs})")
    return sorted(bad)


def fail_on(bad: list[str]):
    if bad:
        pytest.fail(f"{len(bad)} import(s) against the layers ({' -> '.join(reversed(LAYERS))}):\n  "
                    + "\n  ".join(bad), pytrace=False)


def test_every_layer_is_found_and_every_module_has_one():
    """Guards the tests below against passing on an empty or misread tree."""
    assert {layer_of(name) for name in MODULES} == set(LAYERS)
    unplaced = sorted(name for name in MODULES if layer_of(name) == "?")
    assert unplaced == [], f"modules outside every layer (add them to LAYERS or BASE): {unplaced}"


def test_package_imports_run_downward():
    fail_on(upward_imports(m for m in MODULES.values() if m.name.startswith("nfactor_xdp")))


def test_builtin_nfs_import_dataplane_and_below_only():
    fail_on(upward_imports(m for m in MODULES.values() if layer_of(m.name) == "nfs"))


@pytest.mark.parametrize("source, importer, expected", [
    ("from nfactor_xdp.control import switch_agent", "nfactor_xdp.dataplane.migration", "nfactor_xdp.control.switch_agent"),
    ("from ..control.switch_agent import is_marker", "nfactor_xdp.dataplane.migration", "nfactor_xdp.control.switch_agent"),
    ("from .. import errors", "nfactor_xdp.dataplane.migration", "nfactor_xdp.errors"),
    ("from . import packet", "nfactor_xdp.dataplane", "nfactor_xdp.dataplane.packet"),
    ("def f():\n    import nfactor_xdp.tools.probe", "nfactor_xdp.kern.maps", "nfactor_xdp.tools.probe"),
    ("from nfactor_xdp.kern.layouts import FlowKey", "nfs.firewall", "nfactor_xdp.kern.layouts"),
])
def test_imports_are_resolved(tmp_path, source, importer, expected):
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    is_package = importer in MODULES and MODULES[importer].is_package
    assert [t for _, t in imports(Module(importer, path, is_package))] == [expected]


def test_upward_and_unknown_imports_are_reported(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os, bcc\nfrom nfactor_xdp.kern import maps\nfrom nfactor_xdp.dataplane import packet\n"
                    "def f():\n    from ..control import switch_agent\n    import nfactor_xdp.nowhere\n")
    bad = upward_imports([Module("nfactor_xdp.formats.m", path, False)])
    assert [b.split("    ")[0] for b in bad] == ["nfactor_xdp.formats.m -> nfactor_xdp.control.switch_agent",
                                                 "nfactor_xdp.formats.m -> nfactor_xdp.dataplane.packet",
                                                 "nfactor_xdp.formats.m -> nfactor_xdp.nowhere"]
