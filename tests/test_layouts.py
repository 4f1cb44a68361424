"""The Python view of bpf/nfactor_shared.h: sizes, no implicit padding, and
(as root) the same layouts as the BPF compiler produced for the maps."""
import ctypes
import uuid

import pytest

from nfactor_xdp.kern import layouts as L
from nfactor_xdp.kern.layouts import HeaderError, SharedHeader


def test_struct_sizes():
    assert ctypes.sizeof(L.FlowKeyStruct) == 44  # 5-tuple, then the VLAN ids
    assert ctypes.sizeof(L.Flow) == 24
    assert ctypes.sizeof(L.RRTable) == 8 + 4 * L.C["NFX_MAX_RUNTIMES"]
    assert ctypes.sizeof(L.RtStats) % 8 == 0
    assert ctypes.sizeof(L.HEADER.structs["nfx_offload"]) == 160  # whole 8-byte words: counters stay aligned
    assert ctypes.sizeof(L.HEADER.structs["nfx_copy"]) == 8
    assert L.C["NFX_OFFLOADS_PER_RUNTIME"] * L.C["NFX_MAX_RUNTIMES"] == L.C["NFX_MAX_OFFLOADS"]


def test_counters_have_names_and_docs():
    assert len(L.COUNTER_NAMES) == L.C["NFX_CNT_MAX"]
    assert len(set(L.COUNTER_NAMES)) == len(L.COUNTER_NAMES)
    for name in L.COUNTER_NAMES:
        assert L.COUNTER_DOCS.get(name), name


def test_constants_evaluate():
    assert L.C["NFX_SLOT_FABRIC"] == L.C["NFX_SLOT_RT_BASE"] + L.C["NFX_MAX_RUNTIMES"]
    assert L.C["NFX_DEVMAP_SIZE"] == L.C["NFX_SLOT_FABRIC"] + 1
    assert L.C["NFX_RUNTIMES_PER_HOST"] * L.C["NFX_MAX_HOSTS"] == L.C["NFX_MAX_RUNTIMES"]
    assert ctypes.sizeof(L.Host) == 16 and ctypes.sizeof(L.Runtime) == 16
    assert L.RT_STATES[L.C["NFX_RT_RUNNING"]] == "running"


def test_implicit_padding_is_rejected(tmp_path):
    h = tmp_path / "bad.h"
    h.write_text("struct s {\n\t__u8 a;\n\t__u32 b;\n};\n")
    with pytest.raises(HeaderError, match="padding"):
        SharedHeader(h)


def test_unsupported_member_is_rejected(tmp_path):
    h = tmp_path / "bad.h"
    h.write_text("struct s {\n\tchar *p;\n};\n")
    with pytest.raises(HeaderError, match="unsupported"):
        SharedHeader(h)


def _fields(t):
    return [(name, getattr(t, name).offset, getattr(t, name).size) for name, *_ in t._fields_]


@pytest.mark.root
def test_layouts_match_what_bcc_compiled():
    from bcc import BPF

    from nfactor_xdp.kern.loader import Programs, remove_pins
    node = f"l{uuid.uuid4().hex[:6]}"
    progs = Programs(node, tracer=False)
    try:
        progs.load()
        mod = progs.modules["vswitch"]
        expect = {"flows": (L.FlowKeyStruct, L.Flow), "ports": (None, L.Port), "runtimes": (None, L.Runtime),
                  "rr_table": (None, L.RRTable), "config": (None, L.Config), "rt_stats": (None, L.RtStats),
                  "offloads": (None, L.HEADER.structs["nfx_offload"])}
        for name, (key, leaf) in expect.items():
            t = mod[name]
            if key is not None:
                assert ctypes.sizeof(t.Key) == ctypes.sizeof(key), name
                assert _fields(t.Key) == _fields(key), name
            compiled = t.Leaf
            if name == "rt_stats":  # BCC's per-CPU view is an array of the struct
                compiled = compiled._type_
            assert ctypes.sizeof(compiled) == ctypes.sizeof(leaf), name
            assert _fields(compiled) == _fields(leaf), name
        assert mod["counters"].max_entries == L.C["NFX_CNT_MAX"]
        assert isinstance(mod, BPF)
    finally:
        progs.close()
        remove_pins(node)
