"""What several nfactorctl commands share: options made from NodeConfig's
fields (`--name`, and all of `up`'s), JSON output, benchmark results, and
turning errors of lower layers that are not NFactorErrors into ones.

Light on purpose: `nfactorctl --help` imports every command module, and they
all import this one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import contextmanager

import click

from ..errors import NFactorError
from ..formats.config import NodeConfig


class CliError(NFactorError):
    """Refused by nfactorctl itself (bad combination of options and the like)."""


@contextmanager
def refusing(*types: type[BaseException], prefix: str = ""):
    """Report errors of `types` (a lower layer's plain ValueError, say) as a
    CliError, so that they reach the user as `error: PREFIX<message>`."""
    try:
        yield
    except types as e:
        raise CliError(f"{prefix}{e}") from e


class IntList(click.ParamType):
    """A comma-separated list of integers, e.g. 0,1."""

    name = "text"  # the metavar stays TEXT, as in the help texts so far

    def __init__(self, what: str = "integers"):
        self.what = what

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            self.fail(f"a comma-separated list of {self.what}", param, ctx)


def _absolute(ctx, param, value):
    return os.path.abspath(value) if value else value


# NodeConfig fields whose type does not follow from their default.
_FIELD_TYPES = {
    "cores": {"type": IntList("CPU numbers, e.g. 0,1")},
    "controller_hosts": {"type": IntList("host numbers, e.g. 0,1")},
    "policy": {"type": click.Path(exists=True, dir_okay=False), "callback": _absolute},
}


def cli_fields() -> list[dataclasses.Field]:
    """NodeConfig's fields that `nfactorctl up` offers, in declaration order."""
    return [f for f in dataclasses.fields(NodeConfig) if f.metadata.get("cli", True)]


def config_option(f: dataclasses.Field):
    """A click option for NodeConfig field `f`, from its metadata (see
    formats.config.setting): the default and the help live there only."""
    meta = f.metadata
    flag = meta.get("option") or "--" + f.name.replace("_", "-")
    decls = [flag] + ([meta["short"]] if meta.get("short") else [])
    kw = {"help": meta["help"]}
    if f.default is dataclasses.MISSING:  # a default factory: click calls it
        kw.update(default=f.default_factory, show_default=False)
    else:
        kw.update(default=f.default, show_default=f.default is not None)
    if meta.get("choices"):
        kw["type"] = click.Choice(meta["choices"])
    elif isinstance(f.default, bool):
        decls[0] = f"{flag}/--no-{flag[2:]}"
    elif isinstance(f.default, (int, float, str)):
        kw["type"] = type(f.default)
    kw.update(_FIELD_TYPES.get(f.name, {}))
    return click.option(*decls, f.name, **kw)


def _field(name: str) -> dataclasses.Field:
    (f,) = [f for f in dataclasses.fields(NodeConfig) if f.name == name]
    return f


name_option = config_option(_field("name"))
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def on_terminal() -> bool:
    """Progress is for a person at a terminal: never into a pipe or a file."""
    return sys.stderr.isatty()


class Progress:
    """Progress on standard error: a line rewritten in place (update) or one
    line per step (line); nothing unless standard error is a terminal, and
    nothing when `enabled` is False (--json)."""

    def __init__(self, enabled: bool = True):
        self.on = enabled and on_terminal()
        self.width = 0

    def update(self, text: str) -> None:
        if self.on:
            click.echo("\r" + text.ljust(self.width), err=True, nl=False)
            self.width = len(text)

    def line(self, text: str) -> None:
        if self.on:
            self.clear()
            click.echo(text, err=True)

    def clear(self) -> None:
        if self.on and self.width:
            click.echo("\r" + " " * self.width + "\r", err=True, nl=False)
            self.width = 0


def write_result(result: dict, output: str) -> bool:
    """Write a benchmark's JSON to `output` ('-': stdout); True if a file was written."""
    text = json.dumps(result, indent=2)
    if output == "-":
        click.echo(text)
        return False
    with open(output, "w") as f:
        f.write(text + "\n")
    click.echo(f"wrote {output}")
    return True
