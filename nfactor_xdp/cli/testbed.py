"""nfactorctl testbed: source and sink hosts in namespaces around a node."""
from __future__ import annotations

import click

# worker hosts: NFX_MAX_HOSTS less the ingress (tools/testbed_plan.py checks it; `--help` imports nothing heavy)
MAX_HOSTS = 7
from .common import CliError, emit_json, json_option


def testbed_name_option(help: str):
    return click.option("--name", "-n", default="nfx", show_default=True, help=help)


def _testbed(name: str, hosts: int = 0):
    """The testbed `name` as configured by default (a bad name is an error: exit 1)."""
    from ..tools.testbed import Testbed, TestbedConfig
    return Testbed(TestbedConfig(name=name, hosts=hosts))


def _recorded_testbed(name: str):
    """The testbed `name` as `up` recorded it (with its fabric, if any); as
    configured by default if there is no (readable) record."""
    from ..tools.testbed import Testbed, TestbedError
    try:
        return Testbed.load(name)
    except TestbedError:
        return _testbed(name)


@click.group()
def testbed():
    """The built-in testbed: source and sink hosts in namespaces around the node's ports
    (with `up --hosts N`, also worker hosts on a fabric with the node)."""


@testbed.command("up")
@testbed_name_option("Testbed name (prefix of its namespaces).")
@click.option("--hosts", type=click.IntRange(0, MAX_HOSTS), default=0, show_default=True, metavar="N",
              help=f"Also build N worker hosts (0..{MAX_HOSTS}), for a node spanning several hosts: "
                   "namespaces NAME-h1..NAME-hN, each with an interface fab0 on a Linux bridge (br0 in namespace "
                   "NAME-fab, MTU 1600) that the node joins with its own fab0 in NAME-node.  Fabric addresses "
                   "(permanent neighbour entries: no ARP): the node 10.78.0.1/24, MAC 02:78:00:00:00:01; "
                   "worker i 10.78.0.(1+i)/24, MAC 02:78:00:00:00:0(1+i).  0: no fabric.")
def testbed_up(name, hosts):
    """Create namespaces NAME-src, NAME-dst (hosts) and NAME-node (ext0, ext1);
    with --hosts N also worker hosts NAME-h1..NAME-hN on a fabric (NAME-fab)
    that the node joins through its fab0."""
    tb = _testbed(name, hosts)
    tb.up()
    s = tb.show()
    click.echo(f"testbed {name} up: {s['hosts']['src']['netns']} ({s['hosts']['src']['ipv4']}) -> "
               f"{s['namespaces']['node']} [ext0, ext1] -> {s['hosts']['dst']['netns']} "
               f"({s['hosts']['dst']['ipv4']})")
    if "fabric" in s:
        _echo_fabric(s["fabric"])
    click.echo(f"next: nfactorctl up --testbed {name}")


def _echo_fabric(fabric: dict) -> None:
    click.echo(f"fabric: netns {fabric['netns']} bridge {fabric['bridge']} mtu {fabric['mtu']}")
    for h in fabric["hosts"]:
        click.echo(f"  host {h['host']}: netns {h['netns']} {h['ifname']} {h['mac']} {h['ipv4']}")


@testbed.command("down")
@testbed_name_option("Testbed name.")
def testbed_down(name):
    """Remove the testbed's namespaces (and every interface in them), its
    fabric and worker hosts included."""
    removed = _recorded_testbed(name).down()
    click.echo(f"testbed {name} down ({', '.join(removed) if removed else 'nothing to remove'})")


@testbed.command("show")
@testbed_name_option("Testbed name.")
@json_option
def testbed_show(name, as_json):
    """Namespaces, interfaces, addresses and MACs needed to send traffic."""
    s = _recorded_testbed(name).show()  # not recorded as up: what it would be
    if as_json:
        emit_json(s)
        return
    if not s.get("up"):
        raise CliError(f"testbed {name} is not up (nfactorctl testbed up --name {name})")
    for role in ("src", "dst"):
        h = s["hosts"][role]
        click.echo(f"{role}: netns {h['netns']} {h['ifname']} {h['mac']} {h['ipv4']} {h['ipv6']}")
    for port, p in s["node"]["ports"].items():
        click.echo(f"node: netns {s['node']['netns']} {port}: {p['ifname']} {p['mac']}")
    if "fabric" in s:
        _echo_fabric(s["fabric"])
    click.echo(f"try: ip netns exec {s['hosts']['src']['netns']} ping {s['hosts']['dst']['ipv4'].split('/')[0]}")
