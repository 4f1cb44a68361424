"""Living with other XDP tools: a node changes only the programs it attached.

The node's own programs are known by id: those its state records (per port,
and every id a run of the node counted as its own) and the pair its pins name
(the programs it loaded last, which a run that crashed may have left
attached: a restarted node takes its ports back).  `up` refuses a port that
carries any other program unless told to replace it (replace_xdp); `down`
detaches a port's program only if it is one of the node's, so a program
another tool attached meanwhile stays.  Runs in the ports' namespace.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from pyroute2 import IPRoute

from .. import logs
from ..errors import NFactorError
from ..formats import config as nodeconf
from ..formats.config import NodeConfig
from ..kern import xdp
from ..kern.maps import PIN_ROOT, NodeMaps

log = logs.get("supervisor")
OVERRIDE = "--replace-xdp (replace_xdp = true in a config file)"


class PortsTaken(NFactorError):
    pass


def pinned_prog_ids(name: str) -> set[int]:
    """The switch and steer programs node `name` loaded last, from its pins."""
    maps = NodeMaps(name)
    try:
        cfg = maps.config() if maps.exists() else None
    except OSError:
        cfg = None
    finally:
        maps.close()
    return {cfg.prog_ids & 0xFFFFFFFF, cfg.prog_ids >> 32} - {0} if cfg is not None else set()


def owned_prog_ids(name: str) -> set[int]:
    """Every program id node `name` counts as its own (state and pins)."""
    try:
        state = nodeconf.read_state(name) or {}
    except nodeconf.ConfigError:
        state = {}
    ids = set(state.get("xdp_owned") or []) | set((state.get("xdp_progs") or {}).values())
    return {int(i) for i in ids} | pinned_prog_ids(name)


def node_of(prog_id: int) -> str | None:
    """The node whose pins name program `prog_id`, if any."""
    try:
        names = sorted(os.listdir(PIN_ROOT))
    except OSError:
        return None
    return next((n for n in names if prog_id in pinned_prog_ids(n)), None)


def node_ports(cfg: NodeConfig) -> list[str]:
    """The ports `up` attaches to: the external ones and this run's runtime ports."""
    ports = [] if cfg.host_id else [cfg.ext0, cfg.ext1]
    if cfg.hosts:
        ports.append(cfg.fabric_port)
    for rt_id in cfg.runtime_ids:
        ports += nodeconf.runtime_ports(rt_id)
    return ports


def foreign(ipr: IPRoute, ports: list[str], ours: set[int]) -> list[dict]:
    """The programs on `ports` (those that exist) that are not in `ours`."""
    out = []
    for port in ports:
        if not ipr.link_lookup(ifname=port):
            continue
        for mode, prog_id in xdp.programs(ipr, port).items():
            if prog_id not in ours:
                out.append({"port": port, "mode": mode, "id": prog_id, "name": xdp.prog_name(prog_id),
                            "node": node_of(prog_id)})
    return out


def attached_here() -> list[dict]:
    """Every XDP program attached in this namespace, and the node it belongs to."""
    with IPRoute() as ipr:
        return foreign(ipr, [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()], set())


def describe(p: dict) -> str:
    whose = f", node {p['node']!r}'s" if p.get("node") else ""
    name = f' "{p["name"]}"' if p.get("name") else ""
    return f"{p['port']} carries XDP program {p['id']}{name} ({p['mode']}{whose})"


def refuse_taken_ports(cfg: NodeConfig, ours: set[int]) -> None:
    """PortsTaken if a port of the node carries a program that is not its own."""
    if cfg.replace_xdp:
        return
    with IPRoute() as ipr:
        taken = foreign(ipr, node_ports(cfg), ours)
    if taken:
        raise PortsTaken(f"not starting node {cfg.name!r}: port {'; '.join(describe(p) for p in taken)}, "
                         f"which this node did not attach.  Remove it (ip link set dev PORT xdp off) or let "
                         f"the node replace it: {OVERRIDE}")


def may_replace(cfg: NodeConfig, ours: set[int]) -> Callable[[str, int], bool]:
    """For Programs.attach: the node's own programs, and others if replace_xdp (said in the log)."""
    def check(port: str, prog_id: int) -> bool:
        if prog_id in ours:
            return True
        if cfg.replace_xdp:
            log.warning("replacing XDP program %s on %s, which this node did not attach (replace_xdp)",
                        xdp.describe(prog_id), port)
        return cfg.replace_xdp
    return check


def release(ports: list[str], ours: set[int]) -> list[dict]:
    """Detach the node's programs from `ports`; returns the programs left there."""
    left = []
    with IPRoute() as ipr:
        for port in ports:
            if not ipr.link_lookup(ifname=port):
                continue
            for mode, prog_id in xdp.programs(ipr, port).items():
                if prog_id not in ours or not xdp.detach(ipr, port, mode, prog_id):
                    left.append({"port": port, "mode": mode, "id": prog_id, "name": xdp.prog_name(prog_id)})
    for p in left:
        log.info("leaving %s: not this node's", describe(p))
    return left
