"""nfactorctl demo: the whole system for a few seconds, then cleaned up."""
from __future__ import annotations

import sys

import click

from . import EXIT_PARTIAL

# run_demo's return codes that mean something else here: 2, some traffic was lost
_DEMO_EXIT = {2: EXIT_PARTIAL}


@click.command()
@click.option("--runtimes", "-r", default=2, show_default=True, help="Runtimes to start.")
@click.option("--duration", "-d", default=10.0, show_default=True, help="Seconds of traffic.")
@click.option("--udp-flows", default=200, show_default=True, help="UDP flows to send.")
@click.option("--tcp-flows", default=100, show_default=True, help="TCP connections to make.")
@click.option("--name", "-n", default="demo", show_default=True, help="Name for the demo's testbed and node.")
@click.option("--offload", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="Let the actors hand decided flows to the switch (docs/offload.md).")
def demo(runtimes, duration, udp_flows, tcp_flows, name, offload):
    """Testbed up, node up, TCP and UDP flows with a live table, summary, all down."""
    from ..tools.demo import run_demo
    rc = run_demo(name=name, runtimes=runtimes, duration=duration, udp_flows=udp_flows, tcp_flows=tcp_flows,
                  offload=offload)
    sys.exit(_DEMO_EXIT.get(rc, rc))
