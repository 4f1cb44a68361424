"""nfactorctl bench: the benchmarks, each writing its figures as JSON (every
trial with its accounting, NF checks and CPU placement) and printing the
headline figures, invalid trials flagged; a line per trial while they run
(on a terminal); the paper's figures drawn from the JSON (--plot, bench plot)."""
from __future__ import annotations

import collections
import json
import os
import signal
import sys

import click

from .common import CliError, IntList, Progress, emit_json, json_option, write_result


def runtimes_option(help: str = "Runtime counts to measure, comma-separated."):
    return click.option("--runtimes", "counts", type=IntList(), default="1,2", show_default=True, help=help)


def output_option(default: str):
    return click.option("--output", "-o", default=default, show_default=True,
                        help="JSON output file ('-': stdout, and no progress lines).")


plot_option = click.option("--plot", "plot_dir", metavar="DIR", type=click.Path(file_okay=False),
                           help="Also draw the paper's figure(s) as PNG files in DIR (needs matplotlib: the "
                                "package's `plot` extra).")


trials_option = click.option("--trials", "show_trials", is_flag=True,
                             help="Print every trial's accounting, not only the headline figures.")


def accounting_line(t: dict) -> str:
    """offered = forwarded + each counted drop + unaccounted, for one trial."""
    terms = " + ".join(f"{k} {v}" for k, v in t["drops"].items())
    markers = (t.get("markers") or {}).get("among_drops")
    if markers:
        terms += f" (of which {markers} migration markers, not offered)"
    flag = "" if t["valid"] else f"  INVALID: {'; '.join(t['invalid_because'])[:160]}"
    gen = f" (sent {t['sent']}, {t['generator_veth_dropped']} not taken by its veth)" \
        if t["generator_veth_dropped"] else ""
    return (f"offered {t['offered']}{gen} = forwarded {t['forwarded']}" + (f" + {terms}" if terms else "")
            + f" + unaccounted {t['unaccounted']}{flag}")


def _trial_row(t: dict) -> str:
    rate = f"{t['requested_pps'] / 1e6:.4f}" if t.get("requested_pps") else "max"
    return (f"    {t.get('role', 'trial'):<13} asked {rate:>6} offered {t['offered_mpps']:.4f} Mpps: "
            + accounting_line(t))


def _cpu_line(t: dict) -> str:
    """Which CPU did what in one trial."""
    c = t["cpu"]
    place = c["placement"]
    rts = ", ".join(f"rt{rt} on CPU {cpu}" for rt, cpu in place["runtime_cpus"].items())
    cap = "; ".join(f"rt{rt} {v['cpu_s']:.2f} CPU-s, {v['frames_per_cpu_s'] / 1e6:.3f} Mpps per CPU-second"
                    for rt, v in c["runtime_cpu"].items() if v["frames_per_cpu_s"])
    soft = ", ".join(f"CPU {n} {v['softirq']:.2f}" for n, v in c["per_cpu_s"].items())
    other = ", ".join(f"CPU {n} {s:.2f}" for n, s in t["disturbed"].items())
    return (f"generator on CPU {place['generator_cpu']}, {rts}; softirq s: {soft}" + (f"; {cap}" if cap else "")
            + (f"; DISTURBED, other load took s: {other}" if other else ""))


def _search(m: dict) -> str:
    """How a zero-loss search went, in a few words."""
    ts = m["trials"]
    unreconciled = sum(1 for t in ts if t["unaccounted"])
    nf_bad = sum(1 for t in ts if not t["valid"] and t["lost"] == 0 and not t["unaccounted"])
    lossy = sum(1 for t in ts if t["lost"] > 0)
    invalid = sum(1 for t in ts if not t["valid"])
    rerun = f", {m['rerun_trials']} rerun: lossy while other load took a CPU" if m.get("rerun_trials") else ""
    return (f"{len(ts)} trials ({lossy} lossy, {invalid} invalid: {unreconciled} unreconciled, {nf_bad} failed NF "
            f"checks without loss{rerun}), {'confirmed' if m['confirmed'] else 'NOT CONFIRMED'}")


def _flags(m: dict) -> None:
    """The trials of a measurement that say something is wrong beyond loss."""
    for t in m.get("trials", [m]):
        if t["unaccounted"] or (not t["valid"] and t["lost"] == 0):
            click.echo(f"      ! {t.get('role', 'trial')} at {t['offered_mpps']:.4f} Mpps: "
                       f"{'; '.join(t['invalid_because'])[:200]}")


def _ceilings(ceilings: dict, show_trials: bool) -> None:
    for c in ceilings.values():
        limit = "  GENERATOR'S LIMIT: the node lost nothing at full speed" if c["generator_limited"] else ""
        if "zero_loss_mpps" in c:
            click.echo(f"  {c['label']:<26} zero-loss {c['zero_loss_mpps']:.3f} Mpps (max forwarded "
                       f"{c['max_forwarded_mpps']:.3f}), {_search(c)}{limit}")
        else:
            click.echo(f"  {c['label']:<26} {c['forwarded_mpps']:.3f} Mpps forwarded of {c['offered_mpps']:.3f} "
                       f"offered{limit}")
        click.echo(f"  {'':<26} includes: {c['includes']}")
        _details(c, show_trials)


def _details(m: dict, show_trials: bool) -> None:
    _flags(m)
    ts = m.get("trials", [m])
    ref = ts[m["confirming_trials"][-1]] if m.get("confirming_trials") else ts[0]
    click.echo(f"      {ref.get('role', 'trial')}: {_cpu_line(ref)}")
    if show_trials:
        for t in m.get("trials", [m]):
            click.echo(_trial_row(t))


def _ratio(m: dict) -> str:
    return f"{m['ratio_to_lookup_ceiling']:.1%} of lookup, {m['ratio_to_bypass_ceiling']:.1%} of bypass ceiling"


def _trial_line(show: Progress):
    """The benchmark's progress callback: a line per trial on the terminal."""
    def report(p: dict) -> None:
        rate = f"{p['requested_pps'] / 1e6:.4f}" if p.get("requested_pps") else "max"
        minutes, seconds = divmod(int(p["elapsed_s"]), 60)
        show.line(f"[trial {p['trial']:>3}, {minutes:>3}:{seconds:02d}] {p['measuring']:<44} {p['role']:<18} "
                  f"asked {rate:>6} Mpps, offered {p['offered_mpps']:.4f}: lost {p['lost']}"
                  + ("" if p["valid"] else ", INVALID"))
    return report


def _run(entry: str, output: str, show_trials: bool = False, plot_dir: str | None = None, **kw) -> dict | None:
    """Run the benchmark `entry` (tools.bench), write its JSON and draw its
    figures (plot_dir); the result if it went to a file (the table follows,
    starting with the ceilings)."""
    from ..tools import bench as benchmarks
    if plot_dir:
        from ..tools.bench import plots
        plots.pyplot()  # missing matplotlib is said now, not after the run
    show = Progress(enabled=output != "-")
    # killed (SIGTERM) as when interrupted: the testbed and node are taken down on the way out
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        result = getattr(benchmarks, entry)(progress=_trial_line(show) if show.on else None, **kw)
    except RuntimeError as e:  # the harness could not go on (generator, node, policy): said in one line
        raise CliError(f"benchmark stopped: {e}") from None
    written = write_result(result, output)
    if plot_dir:
        click.echo(f"drew {', '.join(plots.plot(result, plot_dir))}", err=not written)
    if not written:
        return None
    if "ceilings" in result:
        _ceilings(result["ceilings"], show_trials)
    return result


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
    """Pass-through rate with 1 and 2 runtimes and the XDP-only ceilings, same run."""
    result = _run("run_forward_bench", output, True, counts=counts, duration=duration, flows=nflows, size=size,
                  batch=batch)
    if not result:
        return
    for m in result["measurements"]:
        click.echo(f"  {m['label']:<26} {m['forwarded_mpps']:.3f} Mpps forwarded ({_ratio(m)}), "
                   f"offered {m['offered_mpps']:.3f} Mpps")
        click.echo(_trial_row(m))
        click.echo(f"  {'':<26} {_cpu_line(m)}")


@bench.command("chains")
@runtimes_option()
@click.option("--trial", default=1.0, show_default=True, help="Seconds per trial of the zero-loss search.")
@click.option("--steps", default=7, show_default=True, help="Binary search steps per chain.")
@click.option("--offload", "offload_modes", type=click.Choice(["off", "on", "both"]), default="both",
              show_default=True, help="Measure with offload off (every frame through Python), on (decided "
              "flows forwarded by the switch), or both.")
@click.option("--chain", "only", multiple=True, metavar="CHAIN",
              help="Measure only this chain (repeatable): NFs comma-separated as in the output "
                   "(flow_monitor,firewall), 'none' for no NF, 'observe' for the full chain in observe mode "
                   "(offload on).  Default: every chain.")
@trials_option
@output_option("bench-chains.json")
@plot_option
def bench_chains(counts, trial, steps, offload_modes, only, show_trials, output, plot_dir):
    """Zero-loss rate per service chain (each NF alone, all three) with 1 and 2 runtimes (paper Fig. 6a),
    with offload off and on; with offload on, the full chain in observe mode too (http_parser fed copies
    while the switch forwards): its zero-loss rate, and the highest rate at which every copy is parsed."""
    modes = ("off", "on") if offload_modes == "both" else (offload_modes,)
    result = _run("run_chain_bench", output, show_trials, plot_dir, counts=counts, trial=trial, steps=steps,
                  offload=modes, only=list(only) or None)
    if not result:
        return
    for m in result["measurements"]:
        share = f"; {m['python_share']:.1%} of frames through Python" if "python_share" in m else ""
        if "observe_copies" in m:
            share += f"; {m['observe_copies']} copies, {m['observe_lost']} lost"
        if m.get("not_offloaded_because") and m.get("offload") == "on":
            share += f"; not offloaded: {'; '.join(m['not_offloaded_because'])}"
        click.echo(f"  {m['label']:<64} zero-loss {m['zero_loss_mpps']:.4f} Mpps ({_ratio(m)}; max forwarded "
                   f"{m['max_forwarded_mpps']:.4f}{share}), {_search(m)}")
        _details(m, show_trials)
    for n in sorted({m["runtimes"] for m in result["measurements"]}):
        first = next(m for m in result["measurements"] if m["runtimes"] == n)
        click.echo(f"  {n} runtime(s): {first['placement']['note']}")


@bench.command("migration")
@click.option("--flows", "flow_counts", type=IntList(), default="100,1000,10000", show_default=True,
              help="Flow counts (Fig. 7), comma-separated.")
@click.option("--rates", type=IntList(), default="10,50,100", show_default=True,
              help="Packets/s per flow (Fig. 7), comma-separated.")
@click.option("--caps", type=IntList(), default="100,500,1000,2000", show_default=True,
              help="Caps on concurrent migrations per runtime (Fig. 8), comma-separated.")
@click.option("--cap-flows", default=2000, show_default=True, help="Flows for the cap measurements (at 10 pps each).")
@click.option("--max-offered", type=float, default=None,
              help="Skip trials offering more frames/s than this (default: what 2 runtimes carry without loss, "
                   "measured, at most 150000).")
@output_option("bench-migration.json")
@plot_option
def bench_migration(flow_counts, rates, caps, cap_flows, max_offered, output, plot_dir):
    """Migrate every flow of runtime 0 to runtime 1 under live traffic: batch time and per-flow
    latency by flow count and rate, and by concurrency cap (paper Fig. 7-8)."""
    result = _run("run_migration_bench", output, plot_dir=plot_dir, flow_counts=flow_counts, rates=rates,
                  caps=caps, cap_flows=cap_flows, max_offered_pps=max_offered)
    if not result:
        return
    *ceilings, carry = result["context"]
    for m in ceilings:
        limit = "  GENERATOR'S LIMIT: the node lost nothing" if m["generator_limited"] else ""
        click.echo(f"  {m['label']:<26} {m['forwarded_mpps']:.3f} Mpps forwarded at full speed{limit}")
    click.echo(f"  {carry['label']:<26} {carry['zero_loss_mpps']:.4f} Mpps ({_ratio(carry)}), {_search(carry)}")
    click.echo(f"  trials offering more are skipped: {result['offered_limit_pps']['limit']} frames/s")
    click.echo(f"  chain: {' -> '.join(result['load']['chain']) or 'no NF'}; * = like the paper's figure "
               f"(its chain, no flow queued behind the cap, nothing lost)")
    click.echo(f"  {'trial':<26} {'migrated':>8} {'failed':>6} {'batch ms':>9} {'batch us/flow':>13} "
               f"{'flow us avg/p50/p99':>21} {'lost (in batch)':>15}  valid")
    like: dict[int, list[float]] = {}
    for m in result["fig7_flows_rates"] + result["fig8_caps"]["measurements"]:
        if m.get("skipped"):
            click.echo(f"  {m['label']:<26} skipped: {m['reason']}")
            continue
        if m.get("migrated") is not None:
            lat, t = m["flow_latency_us"], m["trial"]
            lat_s = f"{lat['avg']:.0f}/{lat['p50']:.0f}/{lat['p99']:.0f}" if lat else "-"
            if m.get("like_paper") and lat:
                like.setdefault(m["flows"], []).append(lat["avg"])
            click.echo(f"  {m['label'] + (' *' if m.get('like_paper') else ''):<26} {m['migrated']:>8} "
                       f"{m['failed']:>6} {m['batch_seconds'] * 1000:>9.1f} {m['batch_us_per_flow']:>13.0f} "
                       f"{lat_s:>21} {t['lost']:>7} ({m['window']['lost']:>5})  "
                       f"{'yes' if t['valid'] else 'NO: ' + '; '.join(t['invalid_because'])[:120]}"
                       f"{' (DISTURBED: other load took a CPU)' if t['disturbed'] else ''}")
            click.echo(f"  {'':<26} {accounting_line(t)}")
        if m.get("error"):
            click.echo(f"  {m['label'] if m.get('migrated') is None else '':<26} error: {m['error']}")
    p = result["paper_reference"]
    click.echo(f"  paper: {p['flow_latency_us']} us, {p['what']}")
    for n, avgs in sorted(like.items()):
        click.echo(f"  here, like for like (rows *), {n} flows: {min(avgs):.0f}-{max(avgs):.0f} us average flow "
                   f"migration latency")


@bench.command("replication")
@runtimes_option("Runtime counts for the throughput, comma-separated.")
@click.option("--flows", "flow_counts", type=IntList(), default="1000,10000,50000", show_default=True,
              help="Flow counts for the crash trials, comma-separated.")
@click.option("--takeover", "takeovers", type=click.Choice(["on", "off", "both"]), default="both", show_default=True,
              help="Crash trials with the peer taking the killed runtime's flows at once (on), with them waiting "
                   "for its restart and recovery (off), or each.")
@trials_option
@output_option("bench-replication.json")
@plot_option
def bench_replication(counts, flow_counts, takeovers, show_trials, output, plot_dir):
    """Throughput with and without state snapshots every 10 packets, and a runtime killed
    with -9 under its flows' traffic, by flow count (paper Fig. 10): when its peer has taken
    its flows (takeover on) or it is running again with them recovered (off), and the frames
    lost across the crash."""
    result = _run("run_replication_bench", output, show_trials, plot_dir, counts=counts, flow_counts=flow_counts,
                  takeovers=("on", "off") if takeovers == "both" else (takeovers,))
    if not result:
        return
    for m in result["throughput"]:
        if m.get("error"):
            click.echo(f"  {m['label']:<26} error: {m['error']}")
            continue
        lost = ""
        if "zero_loss_lost_ratio" in m:
            lost = f"; lost with replication: {m['zero_loss_lost_ratio']:.1%} zero-loss, " \
                   f"{m.get('max_forwarded_lost_ratio', 0):.1%} max"
        click.echo(f"  {m['label']:<26} zero-loss {m['zero_loss_mpps']:.4f} Mpps ({_ratio(m)}; max forwarded "
                   f"{m['max_forwarded_mpps']:.4f}), peers {m['replica_peers']}, "
                   f"snapshots {m['replication']['snapshots_sent']}{lost}")
        click.echo(f"  {'':<26} {_search(m)}" + (f"; {m['note']}" if m.get("note") else ""))
        _details(m, show_trials)
    click.echo(f"  {'kill -9 of runtime 0':<26} {'actors':>7} {'back':>9} {'detect s':>8} {'back s':>9} {'own s':>7}  "
               f"{'lost across the crash':>22}  stable")
    click.echo(f"  {'':<26} back: flows taken by runtime 1 (takeover on) or recovered by the restarted runtime 0; "
               f"back s: kill to that, own s: the taker's or recovery's own time")
    for m in result["recovery"]:
        _show_recovery(m)
    p = result["paper_reference"]
    click.echo(f"  paper: {p['throughput_lost_ratio']:.0%} throughput lost, recovery {p['recovery_total_s']} s "
               f"({p['recovery_fetch_replay_s']} s fetching/replaying)")


@bench.command("hosts")
@click.option("--flows", "flow_counts", type=IntList(), default="1000,10000", show_default=True,
              help="Flow counts for the host-failure trials, comma-separated.")
@click.option("--migration-flows", default=100, show_default=True, help="Flows in the migration trials.")
@trials_option
@output_option("bench-hosts.json")
def bench_hosts(flow_counts, migration_flows, show_trials, output):
    """Runtimes on a worker host against runtimes on the ingress host, same run
    (a testbed with 2 worker hosts): the forward and full-chain rates, a
    migration between two runtimes of one host and between two hosts, and a
    worker host's failure (its processes killed, its link down) under its
    flows' traffic.  On one machine the hosts share its CPUs: the worker
    figures are the fabric path's cost, not added capacity."""
    result = _run("run_hosts_bench", output, show_trials, flow_counts=flow_counts, migration_flows=migration_flows)
    if not result:
        return
    for m in result["rates"]:
        if m.get("error"):
            click.echo(f"  {m['label']:<32} error: {m['error']}")
            continue
        f, c = m["forward"], m["full_chain"]
        click.echo(f"  {m['label']:<32} forward {f['forwarded_mpps']:.4f} Mpps ({_ratio(f)}){_of_ingress(f)}")
        click.echo(f"  {'':<32} full chain zero-loss {c['zero_loss_mpps']:.4f} Mpps ({_ratio(c)}){_of_ingress(c)}")
        click.echo(_trial_row(f))
    for m in result["migration"]:
        if m.get("error"):
            click.echo(f"  {m['label']:<32} error: {m['error']}")
            continue
        lat = m.get("flow_latency_us") or {}
        click.echo(f"  {m['label']:<32} {m['migrated']} of {m['total']} migrated, {m['failed']} failed; "
                   f"one flow {lat.get('avg', '-')} us avg, p99 {lat.get('p99', '-')} us; batch "
                   f"{m['batch_seconds']} s; lost {m['trial']['lost']} of {m['trial']['offered']}")
    for m in result["failure"]:
        if m.get("skipped") or m.get("error"):
            click.echo(f"  {m['label']:<32} {m.get('reason') or 'error: ' + m['error']}")
            continue
        t = m["trial"]
        click.echo(f"  {m['label']:<32} fenced after {m['fenced_s']} s, {m['actors_taken']} of "
                   f"{m['actors_before']['rt8']} flows taken after {m['taken_s']} s; lost {m['lost_across_failure']} "
                   f"of {t['offered']} ({m['lost_with_host']} went to the host and never came back, "
                   f"{m['died_counted_by_host']} of them counted there)")
        click.echo(f"  {'':<32} {accounting_line(t)}")


def _of_ingress(d: dict) -> str:
    return f" = {d['of_ingress_host']:.0%} of the ingress host's" if "of_ingress_host" in d else ""


def _show_recovery(m: dict) -> None:
    if m.get("skipped"):
        click.echo(f"  {m['label']:<26} skipped: {m['reason']}")
    elif m.get("error"):
        click.echo(f"  {m['label']:<26} error: {m['error']}")
    else:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        t = m["trial"]
        on = m.get("takeover") == "on"
        back = m.get("actors_taken") if on else m.get("actors_recovered")
        back_s = m.get("taken_s") if on else m.get("running_again_s")
        own = (m.get("takeover_stats") or {}).get("seconds") if on else m.get("recovery_seconds")
        click.echo(f"  {m['label']:<26} {m['actors_before'][0]:>7} {f(back, '>9')} "
                   f"{f(m['detected_s'], '>8.3f')} {f(back_s, '>9.3f')} "
                   f"{f(own, '>7.3f')}  {m['lost_across_crash']:>9} of {t['offered']:<9}  "
                   f"{'no: a runtime crashed again' if m.get('crashed_again') else 'yes'}")
        click.echo(f"  {'':<26} {accounting_line(t)}; of the unaccounted, {m['lost_with_killed_runtime']} "
                   f"died with the killed runtime (into its socket, never counted or sent back)")
        click.echo(f"  {'':<26} flow_monitor counts lost with the crash: {m['counts_lost_in_crash']} frames "
                   f"(at most K-1 per flow: {m['counts_lost_bound']})")
    for rt, e in (m.get("runtime_log_errors") or {}).items():
        click.echo(f"  {'':<26} {rt} ({e['lines']} error lines): {e['last'][-1][:90]}")


@bench.command("costs")
@click.option("--frames", default=50_000, show_default=True, help="Frames per round.")
@click.option("--rounds", default=5, show_default=True, help="Rounds per figure (the median is reported).")
@output_option("bench-costs.json")
def bench_costs(frames, rounds, output):
    """Nanoseconds per frame of the runtime's Python path (no root, no kernel): ring
    handling, parser, flow lookup and actor, each NF, the full chain; valid only if
    every NF did its work on every frame."""
    from ..tools.bench.costs import run_costs_bench
    result = run_costs_bench(frames=frames, rounds=rounds)
    if not write_result(result, output):
        return
    ns = result["ns_per_frame"]
    for name in ("ring_handling", "parse_full", "lookup_and_actor_fast_path", "lookup_and_actor_full_parser",
                 "tcp_baseline_no_nf"):
        click.echo(f"  {name:<30} {ns[name]:>8.0f} ns")
    for name, m in ns["nfs"].items():
        click.echo(f"  {name:<30} {m['nf_ns']:>8.0f} ns   ({m['frame']}; {m['total_ns']:.0f} ns with lookup)")
    c = ns["full_chain"]
    click.echo(f"  {'->'.join(c['chain']):<30} {c['nfs_ns']:>8.0f} ns   ({c['total_ns']:.0f} ns with lookup)")
    if not result["valid"]:
        click.echo(f"  INVALID: {'; '.join(result['problems'])}")


@bench.command("plot")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", default="figures", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the PNG files.")
@json_option
def bench_plot(results, out_dir, as_json):
    """Draw the paper's figures as PNG from RESULTS, the JSON files of `bench chains` (Fig. 6a),
    `bench migration` (Fig. 7, 8) and `bench replication` (Fig. 10).  Needs matplotlib."""
    from ..tools.bench import plots
    plots.pyplot()  # missing matplotlib: said once, plainly
    loaded = []
    for path in results:
        try:
            with open(path) as f:
                loaded.append((path, json.load(f)))
        except ValueError as e:
            raise CliError(f"{path}: not JSON ({e})") from None
    def kind(r):
        return r.get("benchmark") if isinstance(r, dict) else None
    kinds = collections.Counter(kind(r) for _, r in loaded)
    drawn = {}
    for path, r in loaded:
        # two results of one benchmark: each file's figures named after it
        prefix = os.path.splitext(os.path.basename(path))[0] + "-" if kinds[kind(r)] > 1 else ""
        try:
            drawn[path] = plots.plot(r, out_dir, prefix)
        except plots.PlotError as e:
            raise CliError(f"{path}: {e}") from None
    if as_json:
        emit_json(drawn)
        return
    for path, pngs in drawn.items():
        click.echo(f"{path}: {', '.join(pngs)}")
