"""A node's settings in a TOML file: `nfactorctl up --config FILE`.

Keys are NodeConfig's field names, the settings `up` offers as options, at
the top level: `flow_table_size = 4096` is `--flow-table-size 4096`,
`other_action = "drop"` is `--other drop`.  Values have the setting's TOML
type (a string, an integer, a float, a boolean, `cores = [0, 1]`); TOML has
no null, so a setting without a default (netns, policy) is left out to stay
unset.  A relative `policy` path is taken from the file's directory.  Options
given on the command line override the file; the file overrides the defaults.

`example()` writes every key with its default and help: vm/nfactor.toml.example
is its output (`python -m nfactor_xdp.formats.config_file > vm/nfactor.toml.example`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import textwrap
import tomllib
import types
import typing

from .config import ConfigError, NodeConfig


def fields() -> dict[str, dataclasses.Field]:
    """The settings a file may hold: those `up` offers as options."""
    return {f.name: f for f in dataclasses.fields(NodeConfig) if f.metadata.get("cli", True)}


def default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option(f: dataclasses.Field) -> str:
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")


def _wanted(name: str) -> type:
    """The setting's type without None: int, float, str, bool or list (of ints)."""
    hint = typing.get_type_hints(NodeConfig)[name]
    if typing.get_origin(hint) is list:
        return list
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def _line(text: str, key: str) -> int | None:
    """The line where top-level `key` (or table [key]) is set; tomllib gives no positions."""
    m = re.search(rf'^[ \t]*(\[+[ \t]*)?("?){re.escape(key)}\2[ \t]*[=\].]', text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _checked(name: str, value):
    """The value for setting `name`, or why it is not one."""
    want = _wanted(name)
    if want is list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        raise ValueError("expected a list of integers, e.g. [0, 1]")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ValueError(f"expected {_KIND[want]}, got {_KIND.get(type(value), type(value).__name__)} {value!r}")
    choices = fields()[name].metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "an array",
         dict: "a table"}


def _unknown(key: str) -> str:
    """An unknown key's error, with the setting it most likely means."""
    known = fields()
    by_option = {option(f)[2:]: n for n, f in known.items()}  # e.g. "other" -> other_action
    guess = by_option.get(key) or by_option.get(key.replace("_", "-"))
    if not guess:
        close = difflib.get_close_matches(key, list(known), n=1)
        guess = close[0] if close else None
    return f"unknown key {key!r}" + (f" (did you mean {guess!r}?)" if guess else "")


def read(path: str) -> dict:
    """The settings in TOML file `path` (field name -> value); ConfigError
    names the file, the line and the key of the first problem."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
        doc = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    known, out = fields(), {}
    for key, value in doc.items():
        where = f"{path}:{_line(text, key) or '?'}"
        if key not in known:
            raise ConfigError(f"{where}: {_unknown(key)}; the keys are NodeConfig's settings, e.g. "
                              f"flow_table_size (see vm/nfactor.toml.example)")
        try:
            out[key] = _checked(key, value)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    if out.get("policy"):
        out["policy"] = os.path.join(os.path.dirname(os.path.abspath(path)), out["policy"])
    return out


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def example() -> str:
    """Every setting with its help, its option and its default, as TOML."""
    out = ["# NFActor-XDP node settings: nfactorctl up --config FILE (options given to up override them).",
           "# Every key with its default; a commented key has no default.  Generated from NodeConfig:",
           "#   python -m nfactor_xdp.formats.config_file > vm/nfactor.toml.example", ""]
    for name, f in fields().items():
        choices = f.metadata.get("choices")
        flag = f"{option(f)}; one of {', '.join(choices)}" if choices else option(f)
        out += textwrap.wrap(f"{f.metadata['help']} ({flag})", 96, initial_indent="# ", subsequent_indent="# ")
        value = default(f)
        unset = '"..."' if _wanted(name) is str else "..."
        out += [f"# {name} = {unset}" if value is None else f"{name} = {_toml(value)}", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(example(), end="")
