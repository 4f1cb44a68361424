"""nfactorctl probe: does this machine have what a node needs?"""
from __future__ import annotations

import sys

import click

from . import EXIT_ERROR, EXIT_OK
from .common import emit_json, json_option


@click.command()
@json_option
def probe(as_json):
    """Check every kernel and system feature the node needs; say what is missing."""
    from ..tools.probe import run_probe
    checks = run_probe()
    if as_json:
        emit_json(checks)
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else "MISSING"
            click.echo(f"{mark:<8} {c['check']:<24} {c['detail']}")
            if not c["ok"] and c["hint"]:
                click.echo(f"{'':<8} {'':<24} -> {c['hint']}")
    sys.exit(EXIT_OK if all(c["ok"] for c in checks) else EXIT_ERROR)
