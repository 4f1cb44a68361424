"""nfactorctl migrate: move flows between runtimes under traffic."""
from __future__ import annotations

import sys

import click

from . import EXIT_PARTIAL
from .common import CliError, Progress, emit_json, json_option, name_option


@click.command()
@name_option
@click.option("--from", "src", type=int, required=True, help="Source runtime id.")
@click.option("--to", "dst", type=int, required=True, help="Target runtime id.")
@click.option("--all", "all_flows", is_flag=True, help="Every flow of the source runtime.")
@click.option("--count", type=int, help="This many of its flows.")
@click.option("--flow", "flows_", multiple=True,
              help="A flow: 'udp 10.77.0.1:5000 10.77.0.2:9000' (either direction) or its key in hex; repeatable.")
@json_option
def migrate(name, src, dst, all_flows, count, flows_, as_json):
    """Move flows between runtimes while traffic flows (paper 5: three passes with a
    data-plane marker; no packet lost, none processed twice, order kept).

    Returns when every migration has finished."""
    from ..control import node_client as nodectl
    from ..formats.flowkey import parse as parse_flow
    if sum(bool(x) for x in (all_flows, count is not None, flows_)) != 1:
        raise CliError("say which flows: --all, --count N or --flow KEY")
    keys = [parse_flow(f).hex() for f in flows_] or None
    show = Progress(enabled=not as_json)

    def progress(r: dict) -> None:
        done = r.get("succeeded", 0) + r.get("failed", 0)
        show.update(f"migrating: {done}/{r.get('total', 0)} flows done, {r.get('failed', 0)} failed")
    try:
        report = nodectl.migrate(name, src, dst, count=count, keys=keys, progress=progress if show.on else None)
    finally:
        show.clear()
    if as_json:
        emit_json(report)
    else:
        click.echo(f"{report['succeeded']} migrated, {report['failed']} failed, {report['retried']} retried, "
                   f"of {report['total']} flows from runtime {src} to {dst}")
        if report["total"]:
            lat = report["flow_latency_us"]
            click.echo(f"  the batch took {report['seconds'] * 1000:.1f} ms ({report['batch_us_per_flow']:.0f} us "
                       f"per flow of the batch)" + (f"; one flow's migration took {lat['avg']:.0f} us on average, "
                                                    f"p99 {lat['p99']:.0f} us" if lat else ""))
        if report.get("not_migratable"):
            click.echo(f"{report['not_migratable']} flows cannot move: their state is larger than a migration "
                       f"carries (nfactorctl flows shows them as not migratable)")
        if report["failed"]:
            click.echo(f"last error: {report.get('last_error')}")
    if report["failed"]:
        sys.exit(EXIT_PARTIAL)
