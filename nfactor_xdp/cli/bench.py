"""nfactorctl bench: the benchmarks, each writing its figures as JSON."""
from __future__ import annotations

import click

from .common import IntList, write_result


def runtimes_option(help: str = "Runtime counts to measure, comma-separated."):
    return click.option("--runtimes", "counts", type=IntList(), default="1,2", show_default=True, help=help)


def output_option(default: str):
    return click.option("--output", "-o", default=default, show_default=True,
                        help="JSON output file ('-' for stdout).")


@click.group()
def bench():
    """Benchmarks; each writes its figures as JSON."""


@bench.command("forward")
@runtimes_option()
@click.option("--duration", default=5.0, show_default=True, help="Seconds per measurement.")
@click.option("--flows", "nflows", default=64, show_default=True, help="Flows in the offered load.")
@click.option("--size", default=64, show_default=True, help="Frame size in bytes.")
@click.option("--batch", default=64, show_default=True, help="Frames a runtime takes per loop iteration.")
@output_option("bench-forward.json")
def bench_forward(counts, duration, nflows, size, batch, output):
    """Pass-through rate with 1 and 2 runtimes and the XDP-only ceiling, same run."""
    from ..tools.bench import run_forward_bench
    result = run_forward_bench(counts, duration=duration, flows=nflows, size=size, batch=batch)
    if write_result(result, output):
        for m in result["measurements"]:
            click.echo(f"  {m['label']:<22} {m['forwarded_mpps']:.3f} Mpps forwarded "
                       f"({m['ratio_to_ceiling']:.1%} of ceiling), offered {m['offered_mpps']:.3f} Mpps")


@bench.command("chains")
@runtimes_option()
@click.option("--trial", default=1.0, show_default=True, help="Seconds per trial of the zero-loss search.")
@click.option("--steps", default=7, show_default=True, help="Binary search steps per chain.")
@output_option("bench-chains.json")
def bench_chains(counts, trial, steps, output):
    """Zero-loss rate per service chain (each NF alone, all three) with 1 and 2 runtimes (paper Fig. 6a)."""
    from ..tools.bench import run_chain_bench
    result = run_chain_bench(counts, trial=trial, steps=steps)
    if write_result(result, output):
        for m in result["measurements"]:
            click.echo(f"  {m['label']:<52} zero-loss {m['zero_loss_mpps']:.3f} Mpps "
                       f"(max forwarded {m['max_forwarded_mpps']:.3f})")


@bench.command("migration")
@click.option("--flows", "flow_counts", type=IntList(), default="100,1000,10000", show_default=True,
              help="Flow counts (Fig. 7), comma-separated.")
@click.option("--rates", type=IntList(), default="10,50,100", show_default=True,
              help="Packets/s per flow (Fig. 7), comma-separated.")
@click.option("--caps", type=IntList(), default="100,500,1000,2000", show_default=True,
              help="Caps on concurrent migrations per runtime (Fig. 8), comma-separated.")
@click.option("--cap-flows", default=2000, show_default=True, help="Flows for the cap measurements (at 10 pps each).")
@click.option("--max-offered", type=float, default=None,
              help="Skip trials offering more frames/s than this (default: what 2 runtimes carry, measured, "
                   "at most 150000).")
@output_option("bench-migration.json")
def bench_migration(flow_counts, rates, caps, cap_flows, max_offered, output):
    """Migrate every flow of runtime 0 to runtime 1 under live traffic: time per flow and
    per batch by flow count and rate, and by concurrency cap (paper Fig. 7-8)."""
    from ..tools.bench import run_migration_bench
    result = run_migration_bench(flow_counts=flow_counts, rates=rates, caps=caps, cap_flows=cap_flows,
                                 max_offered_pps=max_offered)
    if not write_result(result, output):
        return
    for m in result["context"]:
        click.echo(f"  {m['label']:<26} {m['forwarded_mpps']:.3f} Mpps forwarded "
                   f"({m['ratio_to_ceiling']:.1%} of ceiling)")
    click.echo(f"  {'trial':<26} {'migrated':>8} {'failed':>6} {'retried':>7} {'batch ms':>9} {'us/flow':>8} "
               f"{'grace ms':>8} {'graces':>6} {'lost':>6}")
    for m in result["fig7_flows_rates"] + result["fig8_caps"]["measurements"]:
        if m.get("skipped"):
            click.echo(f"  {m['label']:<26} skipped: {m['reason']}")
            continue
        if m.get("migrated") is not None:
            sa = m["switch_agent"]
            click.echo(f"  {m['label']:<26} {m['migrated']:>8} {m['failed']:>6} {m['retried']:>7} "
                       f"{m['seconds'] * 1000:>9.1f} {m['avg_flow_us']:>8.0f} {sa['grace_us_avg'] / 1000:>8.1f} "
                       f"{sa['membarriers']:>6} {m['lost']:>6}")
        if m.get("error"):
            click.echo(f"  {m['label'] if m.get('migrated') is None else '':<26} error: {m['error']}")
    click.echo(f"  paper: {result['paper_reference']['avg_per_flow_us']} us per flow")


@bench.command("replication")
@runtimes_option("Runtime counts for the throughput, comma-separated.")
@click.option("--flows", "flow_counts", type=IntList(), default="1000,10000,50000", show_default=True,
              help="Flow counts for the recovery time, comma-separated.")
@output_option("bench-replication.json")
def bench_replication(counts, flow_counts, output):
    """Throughput with and without state snapshots every 10 packets, and the recovery time
    of a runtime killed with -9, by flow count (paper Fig. 10)."""
    from ..tools.bench import run_replication_bench
    result = run_replication_bench(counts=counts, flow_counts=flow_counts)
    if not write_result(result, output):
        return
    c = result["ceiling"]
    click.echo(f"  {c['label']:<26} zero-loss {c['zero_loss_mpps']:.3f} Mpps (max forwarded {c['max_forwarded_mpps']:.3f})")
    for m in result["throughput"]:
        if m.get("error"):
            click.echo(f"  {m['label']:<26} error: {m['error']}")
            continue
        lost = ""
        if "zero_loss_lost_ratio" in m:
            lost = f"  lost with replication: {m['zero_loss_lost_ratio']:.1%} zero-loss, " \
                   f"{m.get('max_forwarded_lost_ratio', 0):.1%} max"
        click.echo(f"  {m['label']:<26} zero-loss {m['zero_loss_mpps']:.3f} Mpps (max forwarded "
                   f"{m['max_forwarded_mpps']:.3f}), peers {m['replica_peers']}, "
                   f"snapshots {m['replication']['snapshots_sent']}{lost}")
    click.echo(f"  {'recovery':<26} {'actors':>7} {'recovered':>9} {'detect s':>8} {'running s':>9} {'own s':>7}  stable")
    for m in result["recovery"]:
        _show_recovery(m)
    p = result["paper_reference"]
    click.echo(f"  paper: {p['throughput_lost_ratio']:.0%} throughput lost, recovery {p['recovery_total_s']} s "
               f"({p['recovery_fetch_replay_s']} s fetching/replaying)")


def _show_recovery(m: dict) -> None:
    if m.get("skipped"):
        click.echo(f"  {m['label']:<26} skipped: {m['reason']}")
    elif m.get("error"):
        click.echo(f"  {m['label']:<26} error: {m['error']}")
    else:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        click.echo(f"  {m['label']:<26} {m['actors_before'][0]:>7} {f(m['actors_recovered'], '>9')} "
                   f"{f(m['detected_s'], '>8.3f')} {f(m['running_again_s'], '>9.3f')} "
                   f"{f(m['recovery_seconds'], '>7.3f')}  "
                   f"{'no: a runtime crashed again' if m.get('crashed_again') else 'yes'}")
    for rt, e in (m.get("runtime_log_errors") or {}).items():
        click.echo(f"  {'':<26} {rt} ({e['lines']} error lines): {e['last'][-1][:90]}")
