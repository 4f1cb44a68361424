"""A node's pinned maps, opened by path: the one place that reads and writes
them from Python (agent, runtimes, CLI, tests)."""
from __future__ import annotations

import ctypes
import errno
import os
import socket

from . import layouts as L
from .bpfsys import BPF_EXIST, BpfError, BpfMap

PIN_ROOT = "/sys/fs/bpf/nfactor"

# name -> (key type, value type): the node's own maps as bpf/nfactor_maps.h
# declares them, plus the two whose values the kernel defines (a devmap holds
# ifindexes, an xskmap AF_XDP socket fds), declared in vswitch.c and steer.c.
MAP_TYPES = {**L.MAP_TYPES, "tx_ports": (ctypes.c_uint32, ctypes.c_int32), "xsks": (ctypes.c_uint32, ctypes.c_int32),
             "observers": (ctypes.c_uint32, ctypes.c_uint32)}  # runtime id -> its observe ring (an fd in, an id out)


def pin_dir(node: str) -> str:
    return os.path.join(PIN_ROOT, node)


class NodeMaps:
    """Opens the maps pinned under /sys/fs/bpf/nfactor/<node>/ on demand."""

    def __init__(self, node: str):
        self.node = node
        self.dir = pin_dir(node)
        self._open: dict[str, BpfMap] = {}

    def exists(self) -> bool:
        return os.path.isdir(self.dir) and os.path.exists(os.path.join(self.dir, "config"))

    def __getitem__(self, name: str) -> BpfMap:
        m = self._open.get(name)
        if m is None:
            k, v = MAP_TYPES[name]
            m = self._open[name] = BpfMap.open_pinned(os.path.join(self.dir, name), k, v)
        return m

    def close(self) -> None:
        for m in self._open.values():
            m.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- configuration -------------------------------------------------
    def config(self):
        return self["config"].get(0)

    def write_config(self, *, other_action: str | None = None, mode: int | None = None, host_id: int | None = None,
                     prog_ids: int | None = None) -> None:
        cfg = self.config() or L.Config()
        cfg.abi = L.C["NFX_ABI_VERSION"]
        if other_action is not None:
            cfg.other_action = L.OTHER_ACTIONS[other_action]
        if mode is not None:
            cfg.mode = mode
        if prog_ids is not None:
            cfg.prog_ids = prog_ids
        if host_id is not None:
            cfg.host_id = host_id
        self["config"].set(0, cfg)

    def set_port(self, ifindex: int, role: int, runtime: int = 0) -> None:
        self["ports"].set(ifindex, L.Port(role=role, runtime=runtime))

    def set_slot(self, slot: int, ifindex: int) -> None:
        self["tx_ports"].set(slot, ifindex)

    def set_runtime(self, rt_id: int, state: int, ifindex: int | None = None, host: int | None = None) -> None:
        cur = self["runtimes"].get(rt_id) or L.Runtime()
        cur.state = state
        if ifindex is not None:
            cur.ifindex = ifindex
        if host is not None:
            cur.host = host
        self["runtimes"].set(rt_id, cur)

    def set_host(self, host_id: int, ipv4: str, mac: str | None, fenced: bool = False) -> None:
        """A host's fabric address; known (frames may go to it) once its MAC is."""
        h = L.Host()
        h.ipv4[:] = list(socket.inet_aton(ipv4))
        if mac:
            h.mac[:] = [int(b, 16) for b in mac.split(":")]
            h.flags = L.C["NFX_HOST_KNOWN"]
        cur = self["hosts"].get(host_id)
        if fenced or (cur is not None and cur.flags & L.C["NFX_HOST_FENCED"]):  # only the controller lifts it
            h.flags |= L.C["NFX_HOST_FENCED"]
        self["hosts"].set(host_id, h)

    def fence_host(self, host_id: int, fenced: bool = True) -> None:
        """Fenced: the switch drops whatever the host sends, and sends it nothing."""
        h = self["hosts"].get(host_id) or L.Host()
        h.flags = (h.flags | L.C["NFX_HOST_FENCED"]) if fenced else (h.flags & ~L.C["NFX_HOST_FENCED"])
        self["hosts"].set(host_id, h)

    def host_table(self) -> dict[int, dict]:
        out = {}
        for i in range(L.C["NFX_MAX_HOSTS"]):
            h = self["hosts"].get(i)
            if h is not None and any(h.ipv4):
                out[i] = {"ipv4": socket.inet_ntoa(bytes(h.ipv4)), "mac": ":".join(f"{b:02x}" for b in h.mac),
                          "known": bool(h.flags & L.C["NFX_HOST_KNOWN"]),
                          "fenced": bool(h.flags & L.C["NFX_HOST_FENCED"])}
        return out

    def publish_rr(self, running: list[int]) -> None:
        t = L.RRTable()
        t.count = len(running)
        for i, rt in enumerate(running):
            t.ids[i] = rt
        self["rr_table"].set(0, t)

    def set_runtime_state(self, rt_id: int, state: int, host: int | None = None) -> None:
        """Change a runtime's state keeping the invariant the switch relies
        on: the round-robin list only holds runtimes that are running."""
        running = self.running_runtimes()
        if state == L.C["NFX_RT_RUNNING"]:
            self.set_runtime(rt_id, state, host=host)
            if rt_id not in running:
                self.publish_rr(running + [rt_id])
        else:
            if rt_id in running:
                self.publish_rr([r for r in running if r != rt_id])
            self.set_runtime(rt_id, state, host=host)

    def running_runtimes(self) -> list[int]:
        t = self["rr_table"].get(0)
        return [t.ids[i] for i in range(min(t.count, L.C["NFX_MAX_RUNTIMES"]))] if t else []

    def delete_flow(self, key: bytes, runtime: int) -> bool:
        """Delete flow `key`'s switch entry if it still places the flow on
        `runtime` (the flow ended there); True if deleted.  An entry placed
        anew meanwhile, or moved by a migration, is left alone.  (Between
        the read and the delete the entry could only change if the LRU
        evicted it and a frame placed it again: microseconds.)"""
        m = self["flows"]
        k = L.FlowKeyStruct.from_buffer_copy(key)
        cur = m.get(k)
        if cur is None or cur.runtime != runtime:
            return False
        return m.delete(k)

    def flow_runtime(self, key: bytes) -> int | None:
        """The runtime flow `key`'s switch entry places it on (None: no entry)."""
        cur = self["flows"].get(L.FlowKeyStruct.from_buffer_copy(key))
        return None if cur is None else cur.runtime

    def set_offload(self, key: bytes, value: int, runtime: int | None = None) -> bool:
        """Point flow `key`'s switch entry at offloads slot value - 1 (0:
        none), keeping its other fields; False if the entry is gone (or, with
        `runtime`, places the flow elsewhere).  Never re-creates an entry the
        switch evicted meanwhile (BPF_EXIST).  A read-modify-write: it must
        not run while the switch agent moves the same flow (it could undo
        the move), which is why migration revokes a flow's offload first."""
        m = self["flows"]
        k = L.FlowKeyStruct.from_buffer_copy(key)
        cur = m.get(k)
        if cur is None or (runtime is not None and cur.runtime != runtime):
            return False
        cur.offload = value
        try:
            m.set(k, cur, BPF_EXIST)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    # --- reading ---------------------------------------------------------
    def counters(self) -> dict[str, int]:
        m = self["counters"]
        out = {}
        for i, name in enumerate(L.COUNTER_NAMES):
            v = m.get(i)
            out[name] = sum(c.value for c in v) if v else 0
        return out

    def runtime_table(self) -> dict[int, dict]:
        out = {}
        for i in range(L.C["NFX_MAX_RUNTIMES"]):
            rt = self["runtimes"].get(i)
            if rt is None or rt.state == L.C["NFX_RT_NONE"]:
                continue
            st = self["rt_stats"].get(i) or []
            stats = {name: sum(getattr(s, name) for s in st)
                     for name, _ in L.RtStats._fields_ if name != "pad"}
            out[i] = {"state": L.RT_STATES.get(rt.state, str(rt.state)),
                      "ifindex": rt.ifindex, "host": rt.host, "switch": stats}
        return out

    def flows(self, limit: int | None = None) -> list[dict]:
        """The switch's flow table: each entry's key (hex) and placement."""
        out = []
        for k, v in self["flows"].items():
            out.append({"key": bytes(k).hex(), "runtime": v.runtime, "orig_dir": v.orig_dir,
                        "created_ns": v.created_ns, "offload": v.offload})
            if limit and len(out) >= limit:
                break
        return out


__all__ = ["NodeMaps", "pin_dir", "PIN_ROOT", "BpfError"]
