"""The bpf(2) syscall from Python: pinned maps and BPF_PROG_TEST_RUN.

BCC compiles and loads the programs (loader.py); everything that only needs
to read or write a pinned map (runtimes registering their socket, the CLI
reading counters) goes through these few commands instead, with no compiler
in the way.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
from typing import Iterator
from ..errors import NFactorError
from .libc import libc


NR_BPF = 321  # x86_64

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
_PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH}


class BpfError(NFactorError, OSError):
    pass


def bpf(cmd: int, attr: bytearray | ctypes.Array) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = libc.syscall(NR_BPF, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return ret


@functools.cache
def possible_cpus() -> int:
    """Per-CPU map values come back as one slot per possible CPU."""
    with open("/sys/devices/system/cpu/possible") as f:
        spec = f.read().strip()
    count = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str) -> int:
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = bytearray(struct.pack("QIIi", ctypes.addressof(name), 0, 0, 0))
    return bpf(BPF_OBJ_GET, attr)


def map_info(fd: int) -> dict:
    info = ctypes.create_string_buffer(96)
    attr = bytearray(struct.pack("IIQ", fd, len(info), ctypes.addressof(info)))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    mtype, mid, ksz, vsz, maxent, flags = struct.unpack_from("IIIIII", info.raw)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return {"type": mtype, "id": mid, "key_size": ksz, "value_size": vsz,
            "max_entries": maxent, "flags": flags, "name": name}


def prog_info(fd: int) -> dict:
    info = ctypes.create_string_buffer(256)
    attr = bytearray(struct.pack("IIQ", fd, len(info), ctypes.addressof(info)))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    ptype, pid = struct.unpack_from("II", info.raw)
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")  # struct bpf_prog_info's name
    return {"type": ptype, "id": pid, "name": name}


def prog_fd_by_id(prog_id: int) -> int:
    """An fd of loaded program `prog_id` (CAP_SYS_ADMIN); the caller closes it."""
    return bpf(BPF_PROG_GET_FD_BY_ID, bytearray(struct.pack("III", prog_id, 0, 0)))


class BpfMap:
    """A map by fd with ctypes key and value types; per-CPU values come back
    as a list with one value per possible CPU."""

    def __init__(self, fd: int, key_type, value_type, *, owned: bool = True):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.info = map_info(fd)
        self.percpu = self.info["type"] in _PERCPU_TYPES
        self._owned = owned
        if self.info["key_size"] != ctypes.sizeof(key_type) or \
                self.info["value_size"] != ctypes.sizeof(value_type):
            sizes = (self.info["key_size"], self.info["value_size"])
            self.close()
            raise BpfError(0, f"map {self.info['name']!r}: key/value sizes {sizes} do not match "
                              f"{(ctypes.sizeof(key_type), ctypes.sizeof(value_type))} (ABI mismatch)")

    @classmethod
    def open_pinned(cls, path: str, key_type, value_type) -> "BpfMap":
        try:
            fd = obj_get(path)
        except BpfError as e:
            raise BpfError(e.errno, f"cannot open pinned map {path}: {e.strerror}") from None
        return cls(fd, key_type, value_type)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _key(self, key):
        return key if isinstance(key, self.key_type) else self.key_type(key)

    def _value_buf(self):
        if self.percpu:
            slot = (ctypes.sizeof(self.value_type) + 7) & ~7
            return ctypes.create_string_buffer(slot * possible_cpus())
        return self.value_type()

    def _decode(self, buf):
        if not self.percpu:
            return buf
        slot = (ctypes.sizeof(self.value_type) + 7) & ~7
        return [self.value_type.from_buffer_copy(buf.raw, i * slot) for i in range(possible_cpus())]

    def get(self, key):
        k = self._key(key)
        v = self._value_buf()
        attr = bytearray(struct.pack("IIQQQ", self.fd, 0, _addr(k), _addr(v), 0))
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except BpfError as e:
            if e.errno == 2:  # ENOENT
                return None
            raise
        return self._decode(v)

    def set(self, key, value, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        v = value if isinstance(value, (self.value_type, ctypes.Array)) else self.value_type(value)
        attr = bytearray(struct.pack("IIQQQ", self.fd, 0, _addr(k), _addr(v), flags))
        bpf(BPF_MAP_UPDATE_ELEM, attr)

    def delete(self, key) -> bool:
        k = self._key(key)
        attr = bytearray(struct.pack("IIQQQ", self.fd, 0, _addr(k), 0, 0))
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr)
        except BpfError as e:
            if e.errno == 2:
                return False
            raise
        return True

    def keys(self) -> Iterator:
        prev = None
        while True:
            nxt = self.key_type()
            attr = bytearray(struct.pack("IIQQQ", self.fd, 0, _addr(prev), _addr(nxt), 0))
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except BpfError as e:
                if e.errno == 2:
                    return
                raise
            yield nxt
            prev = nxt

    def items(self) -> Iterator:
        for k in self.keys():
            v = self.get(k)
            if v is not None:  # deleted between the two calls
                yield k, v


def prog_test_run(prog_fd: int, data: bytes, *, repeat: int = 1, ctx: bytes | None = None,
                  flags: int = 0, data_out_size: int = 4096, batch_size: int = 0) -> dict:
    """BPF_PROG_TEST_RUN: run a program on `data`.  Returns retval, the data as
    the program left it, the average duration (ns) and the context out."""
    din = ctypes.create_string_buffer(bytes(data), len(data))
    dout = ctypes.create_string_buffer(data_out_size) if data_out_size else None
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx is not None else None
    cout = ctypes.create_string_buffer(len(ctx)) if ctx is not None and not flags else None
    attr = bytearray(struct.pack(
        "IIIIQQIIIIQQIII4x",
        prog_fd, 0, len(data), data_out_size if dout is not None else 0,
        _addr(din), _addr(dout), repeat, 0,
        len(ctx) if ctx is not None else 0, len(cout) if cout is not None else 0,
        _addr(cin), _addr(cout), flags, 0, batch_size))
    bpf(BPF_PROG_TEST_RUN, attr)
    _, retval, _, size_out, _, _, _, duration, _, ctx_out_size = struct.unpack_from("IIIIQQIIII", attr)
    return {
        "retval": retval,
        "data": dout.raw[:size_out] if dout is not None else b"",
        "duration_ns": duration,
        "ctx": cout.raw[:ctx_out_size] if cout is not None else b"",
    }


def xdp_md(data_len: int, ingress_ifindex: int = 0, rx_queue_index: int = 0) -> bytes:
    """struct xdp_md for a test run: data is the metadata length (0), data_end
    must equal the frame's length, data_meta and egress_ifindex zero."""
    return struct.pack("IIIIII", 0, data_len, 0, ingress_ifindex, rx_queue_index, 0)
