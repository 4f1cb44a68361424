"""Compiles the node's XDP programs with BCC, pins their maps, attaches and
detaches them.  Must run in the network namespace of the node's ports."""
from __future__ import annotations

import errno
import os
import shutil
import warnings

from pyroute2 import IPRoute

from . import layouts as L
from . import xdp
from .bpfsys import prog_info
from .maps import PIN_ROOT, NodeMaps, pin_dir
from ..errors import NFactorError
from .libc import libc

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TRACEFS = "/sys/kernel/tracing"


# BCC 0.26 warns on every str argument; the calls are correct either way.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="bcc")


class LoaderError(NFactorError):
    pass


def _bcc():
    try:
        import bcc  # Debian's python3-bpfcc, seen through --system-site-packages
    except ImportError as e:
        raise LoaderError("BCC is not importable: install python3-bpfcc and use a venv made "
                          "with --system-site-packages (vm/provision.sh does both)") from e
    return bcc


def ensure_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise LoaderError("bpffs is not mounted on /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf")


def check_features() -> None:
    """What a node needs of this machine and is quick to check, said before
    anything starts, with what to do (`nfactorctl probe` checks everything)."""
    ensure_bpffs()
    _bcc()


def ensure_tracefs() -> bool:
    """The redirect-error tracer needs tracefs; mount it if we can."""
    if os.path.exists(os.path.join(TRACEFS, "events")):
        return True
    try:
        return libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) == 0
    except OSError:
        return False


class Programs:
    """The compiled programs of one node.  Maps are pinned under the node's
    pin directory; compiling again reuses the pins (and so every flow)."""

    def __init__(self, node: str, *, flow_table_size: int = 262144, tracer: bool = True):
        self.node = node
        self.pin_dir = pin_dir(node)
        self.flow_table_size = flow_table_size
        self.want_tracer = tracer
        self.modules: dict[str, object] = {}
        self.fns: dict[str, object] = {}

    def cflags(self) -> list[str]:
        return [f"-I{L.BPF_DIR}", f'-DNFX_PIN_DIR="{self.pin_dir}"',
                f"-DNFX_FLOW_TABLE_SIZE={self.flow_table_size}", "-Wno-unused-function"]

    def _check_pins(self) -> None:
        """Refuse pins written by another ABI or with another flow table size."""
        maps = NodeMaps(self.node)
        if not maps.exists():
            return
        try:
            cfg = maps.config()
            flows = maps["flows"].info["max_entries"]
        except OSError as e:
            raise LoaderError(f"pinned maps under {self.pin_dir} are unusable ({e}); "
                              f"remove them with: nfactorctl down --name {self.node} --purge") from None
        finally:
            maps.close()
        if cfg is not None and cfg.abi not in (0, L.C["NFX_ABI_VERSION"]):
            raise LoaderError(f"pinned maps under {self.pin_dir} are ABI v{cfg.abi}, this is "
                              f"v{L.C['NFX_ABI_VERSION']}: nfactorctl down --name {self.node} --purge")
        if flows != self.flow_table_size:
            raise LoaderError(f"pinned flow table has {flows} entries, asked for "
                              f"{self.flow_table_size}: keep the size or purge the pins")

    def load(self) -> None:
        bcc = _bcc()
        ensure_bpffs()
        self._check_pins()
        os.makedirs(self.pin_dir, exist_ok=True)
        for name, fn in (("vswitch", "nfx_vswitch"), ("steer", "nfx_steer")):
            try:
                mod = bcc.BPF(src_file=str(L.BPF_DIR / f"{name}.c"), cflags=self.cflags())
                self.fns[name] = mod.load_func(fn, bcc.BPF.XDP)
            except Exception as e:
                raise LoaderError(f"cannot compile/load bpf/{name}.c: {e}") from e
            self.modules[name] = mod
        ids = prog_info(self.fns["vswitch"].fd)["id"] | (prog_info(self.fns["steer"].fd)["id"] << 32)
        with NodeMaps(self.node) as maps:
            maps.write_config(prog_ids=ids)
        if self.want_tracer and ensure_tracefs():
            try:
                self.modules["tracer"] = bcc.BPF(src_file=str(L.BPF_DIR / "tracer.c"), cflags=self.cflags())
            except Exception:
                # Not fatal: only the redirect-error counters stay at zero.
                self.modules.pop("tracer", None)

    @property
    def tracing(self) -> bool:
        return "tracer" in self.modules

    def attach(self, ifname: str, which: str, mode: str = "native", may_replace=None) -> str:
        """Attach program `which` to `ifname`; returns the mode used.  A
        program already there is replaced only if may_replace(port, id) says
        so (xdp.attach: else PortTaken)."""
        with IPRoute() as ipr:
            return xdp.attach(ipr, ifname, self.fns[which].fd, mode, may_replace)

    def prog_id(self, which: str) -> int:
        return prog_info(self.fns[which].fd)["id"]

    def close(self) -> None:
        for mod in self.modules.values():
            try:
                mod.cleanup()
            except Exception:
                pass
        self.modules.clear()
        self.fns.clear()


def detach(ifname: str) -> None:
    """Detach whatever XDP program `ifname` has, in any mode; quiet if none or gone."""
    bcc = _bcc()
    for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
        try:
            bcc.BPF.remove_xdp(ifname.encode(), flags)
        except Exception:
            pass


def remove_pins(node: str) -> list[str]:
    """Unpin every map of a node, and the nfactor directory once empty."""
    d = pin_dir(node)
    removed = []
    if os.path.isdir(d):
        removed = sorted(os.listdir(d))
        shutil.rmtree(d, ignore_errors=True)
    try:
        os.rmdir(PIN_ROOT)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise
    return removed


def attach_pass(ifname: str, ns: str | None = None) -> None:
    """Give a veth NAPI by attaching an XDP_PASS program to it.

    Frames XDP-redirected into a veth are only received by its peer if the
    peer has NAPI (an XDP program, or GRO on some kernels); otherwise the
    kernel drops them after bpf_redirect_map() returned success.  The
    testbed's hosts get this; so should any veth a user puts on ext0/ext1.
    """
    from . import netns
    bcc = _bcc()
    mod = bcc.BPF(src_file=str(L.BPF_DIR / "host_pass.c"), cflags=[f"-I{L.BPF_DIR}"])
    try:
        fn = mod.load_func("nfx_host_pass", bcc.BPF.XDP)
        with netns.entered(ns):
            bcc.BPF.attach_xdp(ifname.encode(), fn, XDP_FLAGS_DRV_MODE)
    finally:
        mod.cleanup()
