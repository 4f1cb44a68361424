"""A testbed as the live system has it: its links, addresses and offloads,
read inside its namespaces.  Also the small netlink and ethtool helpers that
building a testbed (tools/testbed.py) uses."""
from __future__ import annotations

import shutil
import socket
import subprocess
from typing import Any

from pyroute2 import IPRoute

from ..kern import netns
from .testbed_plan import FABRIC_BRIDGE, HOSTS, PORTS, TestbedConfig, TestbedError

IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
IFF_UP = 0x1


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def ethtool(ns: str, args: list[str]) -> str:
    """Run ethtool in namespace `ns`; its output, or TestbedError."""
    if shutil.which("ethtool") is None:
        raise TestbedError("ethtool is not installed (Debian package 'ethtool'; vm/provision.sh installs it)")
    try:
        return netns.run(ns, ["ethtool", *args]).stdout
    except subprocess.CalledProcessError as e:
        raise TestbedError(
            f"ethtool {' '.join(args)} failed in {ns}: {(e.stderr or e.stdout or '').strip()}"
        ) from None


def offloads(ns: str, ifname: str) -> dict[str, bool]:
    """GRO and transmit checksum offload of `ifname` in namespace `ns` (from `ethtool -k`)."""
    features = {}
    for line in ethtool(ns, ["-k", ifname]).splitlines():
        key, sep, rest = line.partition(":")
        if sep and rest.strip():
            features[key.strip()] = rest.split()[0] == "on"
    try:
        return {"gro": features["generic-receive-offload"], "tx_checksum": features["tx-checksumming"]}
    except KeyError as e:
        raise TestbedError(f"ethtool -k {ifname} in {ns} reports no {e.args[0]!r}") from None


def show(cfg: TestbedConfig, with_offloads: bool = True) -> dict:
    """What Testbed.show() returns (see there)."""
    info: dict[str, Any] = {
        "name": cfg.name,
        "namespaces": dict(cfg.namespaces),
        "hosts": {},
        "node": {"netns": cfg.netns_name("node"), "ports": {}},
        "up": False,
    }
    ok = True
    for role in HOSTS:
        host = _show_host(cfg, role, with_offloads)
        info["hosts"][role] = host
        ok = ok and host["up"] and host["ipv4"] == cfg.host(role)["ipv4"] \
            and host["ipv6"] == cfg.host(role)["ipv6"]
    ports = _show_ports(cfg)
    info["node"]["ports"] = ports
    ok = ok and all(p["up"] for p in ports.values())
    if cfg.hosts:
        info["fabric"] = _show_fabric(cfg, with_offloads)
        ok = ok and info["fabric"]["up"]
    info["up"] = bool(ok)
    return info


def bridge_port_state(link: Any) -> int | None:
    """The STP state of a bridge port (3: forwarding) from its RTM_NEWLINK
    message; None if it is not a bridge port."""
    linkinfo = link.get_attr("IFLA_LINKINFO")
    if linkinfo is None or linkinfo.get_attr("IFLA_INFO_SLAVE_KIND") != "bridge":
        return None
    data = linkinfo.get_attr("IFLA_INFO_SLAVE_DATA")
    return None if data is None else data.get_attr("IFLA_BRPORT_STATE")


def _link_info(ipr: IPRoute, ifname: str, raw: bool = False) -> dict[str, Any] | None:
    """ifindex, mac, up, operstate of `ifname` (and with `raw`, "mtu" and the
    netlink message as "link"); None if there is no such link."""
    idx = link_index(ipr, ifname)
    if idx is None:
        return None
    link = ipr.get_links(idx)[0]
    info = {
        "ifindex": idx,
        "mac": link.get("IFLA_ADDRESS"),
        "up": bool(link["flags"] & IFF_UP),
        "operstate": link.get("IFLA_OPERSTATE"),
    }
    if raw:
        info["mtu"] = link.get("IFLA_MTU")
        info["link"] = link
    return info


def _addresses(ipr: IPRoute, family: int, index: int) -> list[str]:
    """The usable (global, not tentative, no failed DAD) addresses of a link."""
    return [
        a.get("IFA_ADDRESS")
        for a in ipr.get_addr(family=family, index=index)
        if a["scope"] == 0 and not (a.get("IFA_FLAGS", a["flags"]) & (IFA_F_TENTATIVE | IFA_F_DADFAILED))
    ]


def _show_host(cfg: TestbedConfig, role: str, with_offloads: bool) -> dict[str, Any]:
    plan = cfg.host(role)
    ns, ifname = plan["netns"], plan["ifname"]
    host: dict[str, Any] = {"netns": ns, "ifname": ifname, "mac": None, "ipv4": None,
                            "ipv6": None, "ifindex": None, "up": False, "operstate": None}
    if not netns.exists(ns):
        return host
    with netns.entered(ns), IPRoute() as ipr:
        link = _link_info(ipr, ifname)
        if link is None:
            return host
        host.update(link)
        for family, key in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
            addrs = _addresses(ipr, family, link["ifindex"])
            if addrs:
                host[key] = plan[key] if plan[key] in addrs else addrs[0]
    if with_offloads:
        host["offloads"] = offloads(ns, ifname)
    return host


def _show_ports(cfg: TestbedConfig) -> dict[str, dict[str, Any]]:
    node = cfg.netns_name("node")
    ports: dict[str, dict[str, Any]] = {}
    names = dict(zip(PORTS, (cfg.port0_ifname, cfg.port1_ifname)))
    for key, ifname in names.items():
        ports[key] = {"ifname": ifname, "mac": None, "ifindex": None, "up": False, "operstate": None}
    if not netns.exists(node):
        return ports
    with netns.entered(node), IPRoute() as ipr:
        for key, ifname in names.items():
            link = _link_info(ipr, ifname)
            if link is not None:
                ports[key].update(link)
    return ports


def _show_fabric(cfg: TestbedConfig, with_offloads: bool) -> dict[str, Any]:
    """show()["fabric"]: the bridge and every host's fab0 as the live system
    has them (missing parts are None).  "up" is true when the bridge is up
    with its planned MTU, and every host's fab0 and bridge port are up, with
    the planned MAC, address and MTU, the port forwarding on the bridge."""
    plan = cfg.fabric()
    fab = plan["netns"]
    fabric: dict[str, Any] = {"netns": fab, "bridge": plan["bridge"], "mtu": None, "up": False, "hosts": []}
    ok = True
    ports: dict[str, dict[str, Any]] = {}
    if netns.exists(fab):
        with netns.entered(fab), IPRoute() as ipr:
            bridge = _link_info(ipr, FABRIC_BRIDGE, raw=True)
            if bridge is not None:
                fabric["mtu"] = bridge["mtu"]
                ok = ok and bridge["up"] and bridge["mtu"] == plan["mtu"]
            else:
                ok = False
            for entry in plan["hosts"]:
                port = _link_info(ipr, entry["port"], raw=True)
                if port is not None:
                    port["forwarding"] = bridge_port_state(port["link"]) == 3 \
                        and bridge is not None and port["link"].get("IFLA_MASTER") == bridge["ifindex"]
                    ports[entry["port"]] = port
    else:
        ok = False
    for entry in plan["hosts"]:
        host: dict[str, Any] = {"host": entry["host"], "netns": entry["netns"], "ifname": entry["ifname"],
                                "ipv4": None, "mac": None, "mtu": None, "ifindex": None, "up": False,
                                "operstate": None, "port": entry["port"]}
        if netns.exists(entry["netns"]):
            with netns.entered(entry["netns"]), IPRoute() as ipr:
                link = _link_info(ipr, entry["ifname"], raw=True)
                if link is not None:
                    del link["link"]
                    host.update(link)
                    addrs = _addresses(ipr, socket.AF_INET, link["ifindex"])
                    if addrs:
                        host["ipv4"] = entry["ipv4"] if entry["ipv4"] in addrs else addrs[0]
            if with_offloads and host["ifindex"] is not None:
                host["offloads"] = offloads(entry["netns"], entry["ifname"])
        port = ports.get(entry["port"])
        ok = ok and host["up"] and host["ipv4"] == entry["ipv4"] and host["mac"] == entry["mac"] \
            and host["mtu"] == plan["mtu"] and port is not None and port["up"] and port["forwarding"] \
            and port["mtu"] == plan["mtu"]
        fabric["hosts"].append(host)
    fabric["up"] = bool(ok)
    return fabric
