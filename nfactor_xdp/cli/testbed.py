"""nfactorctl testbed: source and sink hosts in namespaces around a node."""
from __future__ import annotations

import click

from .common import CliError, emit_json, json_option


def testbed_name_option(help: str):
    return click.option("--name", "-n", default="nfx", show_default=True, help=help)


def _testbed(name: str):
    """The testbed `name` as configured by default (a bad name is an error: exit 1)."""
    from ..tools.testbed import Testbed, TestbedConfig
    return Testbed(TestbedConfig(name=name))


@click.group()
def testbed():
    """The built-in testbed: source and sink hosts in namespaces around the node's ports."""


@testbed.command("up")
@testbed_name_option("Testbed name (prefix of its namespaces).")
def testbed_up(name):
    """Create namespaces NAME-src, NAME-dst (hosts) and NAME-node (ext0, ext1)."""
    tb = _testbed(name)
    tb.up()
    s = tb.show()
    click.echo(f"testbed {name} up: {s['hosts']['src']['netns']} ({s['hosts']['src']['ipv4']}) -> "
               f"{s['namespaces']['node']} [ext0, ext1] -> {s['hosts']['dst']['netns']} "
               f"({s['hosts']['dst']['ipv4']})\nnext: nfactorctl up --testbed {name}")


@testbed.command("down")
@testbed_name_option("Testbed name.")
def testbed_down(name):
    """Remove the testbed's namespaces (and every interface in them)."""
    removed = _testbed(name).down()
    click.echo(f"testbed {name} down ({', '.join(removed) if removed else 'nothing to remove'})")


@testbed.command("show")
@testbed_name_option("Testbed name.")
@json_option
def testbed_show(name, as_json):
    """Namespaces, interfaces, addresses and MACs needed to send traffic."""
    from ..tools.testbed import Testbed, TestbedError
    try:
        s = Testbed.load(name).show()
    except TestbedError:  # not recorded as up: what it would be
        s = _testbed(name).show()
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
    click.echo(f"try: ip netns exec {s['hosts']['src']['netns']} ping {s['hosts']['dst']['ipv4'].split('/')[0]}")
