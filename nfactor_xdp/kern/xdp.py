"""Which XDP program a port carries, and attaching or detaching one by
program id, over netlink (RTM_SETLINK, IFLA_XDP).

Every change names the program the port must still carry
(XDP_FLAGS_REPLACE with IFLA_XDP_EXPECTED_FD; none: the port must be empty),
so the kernel refuses it (EEXIST) if another tool changed the port since it
was read: the node never removes or overwrites a program it did not decide
to.  Must run in the ports' network namespace.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import NFactorError
from .bpfsys import BpfError, prog_fd_by_id, prog_info

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4
FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE, "offload": XDP_FLAGS_HW_MODE}
_ID_ATTRS = {"native": "IFLA_XDP_DRV_PROG_ID", "generic": "IFLA_XDP_SKB_PROG_ID",
             "offload": "IFLA_XDP_HW_PROG_ID"}


class XdpError(NFactorError):
    pass


class PortTaken(XdpError):
    """The port carries a program the caller may not replace."""

    def __init__(self, port: str, mode: str, prog_id: int, why: str = ""):
        self.port, self.mode, self.prog_id = port, mode, prog_id
        super().__init__(why or f"port {port} carries XDP program {describe(prog_id)} ({mode})")


def describe(prog_id: int) -> str:
    """`12 "xdp_fw"`: the id and, if it can be read, the program's name."""
    name = prog_name(prog_id)
    return f'{prog_id} "{name}"' if name else str(prog_id)


def prog_name(prog_id: int) -> str | None:
    try:
        with _prog_fd(prog_id) as fd:
            return prog_info(fd)["name"] if fd >= 0 else None
    except BpfError:
        return None


@contextmanager
def _prog_fd(prog_id: int | None) -> Iterator[int]:
    """An fd of program `prog_id`; -1 for None (an empty port)."""
    fd = prog_fd_by_id(prog_id) if prog_id else -1
    try:
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _index(ipr: IPRoute, port: str) -> int:
    found = ipr.link_lookup(ifname=port)
    if not found:
        raise XdpError(f"interface {port!r} not found")
    return found[0]


def programs(ipr: IPRoute, port: str) -> dict[str, int]:
    """The XDP programs attached to `port`: mode (native, generic, offload) -> program id."""
    xdp = ipr.get_links(_index(ipr, port))[0].get_attr("IFLA_XDP")
    if xdp is None:
        return {}
    return {mode: xdp.get_attr(attr) for mode, attr in _ID_ATTRS.items() if xdp.get_attr(attr)}


def _set(ipr: IPRoute, port: str, fd: int, mode: str, expected: int | None) -> None:
    """Attach fd (-1: detach) in `mode` if the slot still holds program `expected` (None: nothing)."""
    with _prog_fd(expected) as expected_fd:
        ipr.link("set", index=_index(ipr, port), xdp={"attrs": [
            ("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", FLAGS[mode] | XDP_FLAGS_REPLACE),
            ("IFLA_XDP_EXPECTED_FD", expected_fd)]})


def detach(ipr: IPRoute, port: str, mode: str, prog_id: int) -> bool:
    """Detach program `prog_id` from `port` if it is still attached there in
    `mode`; False (and the port left as it is) if another program took its place."""
    try:
        _set(ipr, port, -1, mode, prog_id)
    except BpfError as e:
        if e.errno == errno.ENOENT:  # the program is gone, so it is attached nowhere
            return False
        raise
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            return False
        raise
    return True


def attach(ipr: IPRoute, port: str, fd: int, mode: str,
           may_replace: Callable[[str, int], bool] | None = None) -> str:
    """Attach program `fd` to `port` in `mode` (native, generic, or auto:
    native, else generic); returns the mode used.  A program already there is
    replaced only if may_replace(port, its id) says so, else PortTaken."""
    last = None
    for m in ("native", "generic") if mode == "auto" else (mode,):
        now = programs(ipr, port)
        for other, prog_id in now.items():
            if not (may_replace and may_replace(port, prog_id)):
                raise PortTaken(port, other, prog_id)
        # native and generic programs cannot be attached at once: the other goes first
        for other, prog_id in now.items():
            if other not in (m, "offload"):
                detach(ipr, port, other, prog_id)
        try:
            _set(ipr, port, fd, m, now.get(m))
            return m
        except NetlinkError as e:
            if e.code == errno.EEXIST:  # someone changed the port after it was read
                after = programs(ipr, port)
                raise PortTaken(port, m, after.get(m, 0), f"port {port} changed while the node attached its "
                                f"program (now: {_listing(after)})") from None
            if e.code == errno.EBUSY:
                raise XdpError(f"cannot replace the XDP program on {port}: it is attached through a bpf_link "
                               f"(only the tool holding the link can remove it)") from None
            last = e
    raise XdpError(f"cannot attach XDP ({mode}) to {port}: {last}")


def _listing(progs: dict[str, int]) -> str:
    return ", ".join(f"{describe(i)} ({m})" for m, i in progs.items()) or "nothing"
