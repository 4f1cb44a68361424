"""`nfactorctl probe`: checks every kernel and system feature the node needs
and says what is missing and how to get it."""
from __future__ import annotations

import os
import platform
import shutil
import socket
import uuid

from ..kern import netns
from ..kern.bpfsys import prog_test_run, xdp_md


def _check(name: str, fn, hint: str) -> dict:
    try:
        detail = fn()
        return {"check": name, "ok": True, "detail": detail or "", "hint": ""}
    except Exception as e:  # every failure is a finding, never a crash
        return {"check": name, "ok": False, "detail": f"{type(e).__name__}: {e}", "hint": hint}


def _root():
    if os.geteuid() != 0:
        raise PermissionError("not running as root")
    return "uid 0"


def _kernel():
    rel = platform.release()
    major, minor = (int(x) for x in rel.split(".")[:2])
    if (major, minor) < (5, 15):
        raise RuntimeError(f"kernel {rel} is older than 5.15")
    return rel


def _mounted(path):
    def check():
        if not os.path.ismount(path):
            raise FileNotFoundError(f"{path} is not mounted")
        return path
    return check


def _exists(path):
    def check():
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        return os.path.realpath(path)
    return check


def _bcc():
    import bcc  # noqa: F401
    return bcc.__file__


def _tool(name):
    def check():
        p = shutil.which(name)
        if not p:
            raise FileNotFoundError(f"{name} not on PATH")
        return p
    return check


def _bpf_xdp_features():
    """Compile and load an XDP program using every map type the node uses,
    run it with BPF_PROG_TEST_RUN, attach it natively to a veth in a scratch
    namespace and bind an AF_XDP socket to it."""
    from bcc import BPF

    # imported here, inside the check: a broken install is a finding, not a crash
    from ..kern.layouts import BPF_DIR
    from ..kern.loader import XDP_FLAGS_DRV_MODE
    from ..kern.xsk import XskSocket
    b = BPF(src_file=str(BPF_DIR / "probe.c"), cflags=[f"-I{BPF_DIR}"])
    fn = b.load_func("probe", BPF.XDP)
    frame = bytes(60)
    r = prog_test_run(fn.fd, frame, ctx=xdp_md(len(frame)))
    if r["retval"] != 2:
        raise RuntimeError(f"BPF_PROG_TEST_RUN returned {r['retval']}, expected XDP_PASS")
    ns = f"nfx-probe-{uuid.uuid4().hex[:6]}"
    netns.create(ns)
    try:
        with netns.entered(ns):
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                ipr.link("add", ifname="pa", kind="veth", peer="pb")
                for n in ("pa", "pb"):
                    ipr.link("set", index=ipr.link_lookup(ifname=n)[0], state="up")
            BPF.attach_xdp("pa", fn, XDP_FLAGS_DRV_MODE)
            try:
                with XskSocket(socket.if_nametoindex("pa"), 0, num_frames=64, ring_size=64):
                    pass
            finally:
                BPF.remove_xdp("pa", XDP_FLAGS_DRV_MODE)
    finally:
        netns.remove(ns)
        b.cleanup()
    return "hash/lru/percpu/devmap/xskmap maps, test run, native XDP on veth, AF_XDP copy mode"


def _xdp_on_ports():
    """XDP programs already attached here: `up` refuses such a port unless it
    may replace the program (a finding to know, not a missing feature)."""
    from ..control.coexist import OVERRIDE, attached_here, describe
    found = attached_here()
    if not found:
        return "no port carries an XDP program in this namespace"
    return (f"{'; '.join(describe(p) for p in found)}: `up` refuses a port carrying a program that is not its "
            f"own unless {OVERRIDE}")


def run_probe() -> list[dict]:
    kdir = f"/lib/modules/{platform.release()}"
    checks = [
        _check("root", _root, "run as root"),
        _check("kernel", _kernel, "the node needs Linux 5.15 or newer"),
        _check("bpffs", _mounted("/sys/fs/bpf"), "mount -t bpf bpf /sys/fs/bpf (vm/provision.sh does it)"),
        _check("tracefs", _mounted("/sys/kernel/tracing"),
               "mount -t tracefs tracefs /sys/kernel/tracing (needed to count failed redirects)"),
        _check("btf", _exists("/sys/kernel/btf/vmlinux"), "kernel built without CONFIG_DEBUG_INFO_BTF (optional)"),
        _check("kernel headers for BCC", _exists(f"{kdir}/build/include"),
               "install linux-headers-amd64 and link them: vm/provision.sh"),
        _check("bcc", _bcc, "apt-get install python3-bpfcc; use a venv with --system-site-packages"),
        _check("ip (iproute2)", _tool("ip"), "apt-get install iproute2"),
        _check("ethtool", _tool("ethtool"), "apt-get install ethtool (the testbed sets offloads)"),
        _check("xdp on ports", _xdp_on_ports, "netlink (pyroute2) did not answer"),
    ]
    if all(c["ok"] for c in checks if c["check"] in ("root", "bpffs", "bcc", "kernel headers for BCC")):
        checks.append(_check("bpf/xdp/af_xdp", _bpf_xdp_features,
                             "the kernel lacks BPF, XDP, veth or AF_XDP support (CONFIG_XDP_SOCKETS)"))
    else:
        checks.append({"check": "bpf/xdp/af_xdp", "ok": False, "detail": "not tried: fix the above first",
                       "hint": ""})
    return checks
