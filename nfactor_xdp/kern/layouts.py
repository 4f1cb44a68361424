"""The C structs and constants shared with the XDP programs, read from
bpf/nfactor_shared.h so that there is exactly one declaration of each.

The header keeps to a small C subset (see its opening comment); this module
parses that subset into ctypes structures, enum values and #define integers.
Tests check the result against the layouts the BPF compiler produced.
"""
from __future__ import annotations

import ctypes
import re
from importlib import resources
from pathlib import Path
from ..errors import NFactorError

# bpf/ is installed as package data (nfactor_xdp.bpf); BCC needs real paths.
BPF_DIR = Path(str(resources.files("nfactor_xdp.bpf")))
SHARED_HEADER = BPF_DIR / "nfactor_shared.h"
MAPS_HEADER = BPF_DIR / "nfactor_maps.h"

_CTYPES = {
    "__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16,
    "__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64,
    "__s32": ctypes.c_int32, "__s64": ctypes.c_int64,
}


class HeaderError(NFactorError, ValueError):
    pass


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _eval_int(expr: str, names: dict[str, int]) -> int:
    expr = expr.strip()
    if not re.fullmatch(r"[\w\s()+\-*/<>|&~x]+", expr):
        raise HeaderError(f"unsupported expression: {expr!r}")

    def sub(m: re.Match) -> str:
        word = m.group(0)
        if word in names:
            return str(names[word])
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", word):
            return str(int(word, 0))
        raise HeaderError(f"unknown name {word!r} in {expr!r}")

    py = re.sub(r"\b[A-Za-z_]\w*\b|\b0[xX][0-9a-fA-F]+\b|\b\d+\b", sub, expr).replace("/", "//")
    return int(eval(py, {"__builtins__": {}}, {}))  # only digits and operators remain


class SharedHeader:
    """Constants, enums and ctypes structs of one header."""

    def __init__(self, path: Path = SHARED_HEADER):
        self.path = Path(path)
        raw = self.path.read_text()
        self.consts: dict[str, int] = {}
        self.enums: dict[str, dict[str, int]] = {}
        self.enum_docs: dict[str, dict[str, str]] = {}
        self.structs: dict[str, type[ctypes.Structure]] = {}
        self._parse_enum_docs(raw)
        self._parse(_strip_comments(raw))

    def _parse_enum_docs(self, raw: str) -> None:
        for m in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\};", raw, flags=re.S):
            docs = {}
            for line in m.group(2).splitlines():
                d = re.match(r"\s*(\w+)[^/]*/\*\s*(.*?)\s*\*/", line)
                if d:
                    docs[d.group(1)] = d.group(2)
            self.enum_docs[m.group(1)] = docs

    def _parse(self, text: str) -> None:
        for m in re.finditer(r"^[ \t]*#define[ \t]+(\w+)[ \t]+(.+)$", text, flags=re.M):
            try:
                self.consts[m.group(1)] = _eval_int(m.group(2), self.consts)
            except HeaderError:
                pass  # include guards and the like carry no integer
        for m in re.finditer(r"enum\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
            values, nxt = {}, 0
            for item in filter(None, (i.strip() for i in m.group(2).split(","))):
                name, _, val = item.partition("=")
                name = name.strip()
                nxt = _eval_int(val, {**self.consts, **values}) if val else nxt
                values[name] = nxt
                nxt += 1
            self.enums[m.group(1)] = values
            self.consts.update(values)
        for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
            self.structs[m.group(1)] = self._make_struct(m.group(1), m.group(2))

    def _make_struct(self, name: str, body: str) -> type[ctypes.Structure]:
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[(.+)\])?", decl)
            if not m or m.group(1) not in _CTYPES:
                raise HeaderError(f"struct {name}: unsupported member {decl!r}")
            ctype = _CTYPES[m.group(1)]
            if m.group(3):
                ctype = ctype * _eval_int(m.group(3), self.consts)
            fields.append((m.group(2), ctype))
        struct = type(name, (ctypes.Structure,), {"_fields_": fields})
        # Padding is explicit in the header: any implicit padding is a bug there.
        if ctypes.sizeof(struct) != sum(ctypes.sizeof(t) for _, t in fields):
            raise HeaderError(f"struct {name} has implicit padding; pad it by hand")
        return struct

    def ctype(self, name: str):
        """The ctypes type of a C type name used in a map declaration."""
        name = " ".join(name.split())
        if name in _CTYPES:
            return _CTYPES[name]
        if name.startswith("struct ") and name[7:] in self.structs:
            return self.structs[name[7:]]
        raise HeaderError(f"unknown type {name!r}")

    def enum_names(self, enum: str, prefix: str) -> list[str]:
        """Members of `enum` in value order, prefix stripped, lower case."""
        items = sorted(self.enums[enum].items(), key=lambda kv: kv[1])
        return [k[len(prefix):].lower() for k, _ in items if k.startswith(prefix)]


def pinned_map_types(header: SharedHeader, path: Path = MAPS_HEADER) -> dict[str, tuple]:
    """name -> (key type, value type) of every BPF_TABLE_PINNED map declared
    in bpf/nfactor_maps.h, so Python opens each pin with the C types."""
    text = _strip_comments(Path(path).read_text())
    out = {}
    for m in re.finditer(r'BPF_TABLE_PINNED\(\s*"\w+"\s*,\s*([\w ]+?)\s*,\s*([\w ]+?)\s*,\s*(\w+)\s*,', text):
        out[m.group(3)] = (header.ctype(m.group(1)), header.ctype(m.group(2)))
    if not out:
        raise HeaderError(f"{path}: no BPF_TABLE_PINNED declarations found")
    return out


HEADER = SharedHeader()
C = HEADER.consts
FlowKeyStruct = HEADER.structs["nfx_flow_key"]  # the C layout; formats/flowkey.py reads it
Flow = HEADER.structs["nfx_flow"]
Port = HEADER.structs["nfx_port"]
Runtime = HEADER.structs["nfx_runtime"]
RRTable = HEADER.structs["nfx_rr_table"]
Config = HEADER.structs["nfx_config"]
RtStats = HEADER.structs["nfx_rt_stats"]
Host = HEADER.structs["nfx_host"]
MAP_TYPES = pinned_map_types(HEADER)

COUNTER_NAMES = [n for n in HEADER.enum_names("nfx_counter", "NFX_CNT_") if n != "max"]
COUNTER_DOCS = {k[len("NFX_CNT_"):].lower(): v for k, v in HEADER.enum_docs["nfx_counter"].items()}
RT_STATES = {v: k[len("NFX_RT_"):].lower() for k, v in HEADER.enums["nfx_rt_state"].items()}
OTHER_ACTIONS = {k[len("NFX_OTHER_"):].lower(): v for k, v in HEADER.enums["nfx_other_action"].items()}
