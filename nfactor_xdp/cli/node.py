"""nfactorctl up, down, status, flows: a node's life and what it shows."""
from __future__ import annotations

import sys

import click

from ..errors import NFactorError
from ..formats.config import NodeConfig
from .common import cli_fields, config_option, emit_json, json_option, name_option, refusing

# up's options besides NodeConfig's fields (tests/test_cli_layout.py checks both sets)
testbed_option = click.option("--testbed", "testbed_name", metavar="NAME",
                              help="Run on testbed NAME's node namespace and ports (see `nfactorctl testbed`).")
worker_option = click.option("--worker", type=click.IntRange(1, 7), metavar="N",
                             help="Run this host as worker host N of a node with --hosts: its runtimes only, "
                                  "named NAME-hN here (pins, logs, `down --name NAME-hN`).  Start the ingress "
                                  "host (no --worker) first.  With --testbed: the testbed's host N.")
foreground_option = click.option("--foreground", is_flag=True,
                                 help="Run the supervisor in this process until Ctrl-C (systemd).")
config_file_option = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                                  help="TOML file of settings, keyed by the settings' names (flow_table_size = "
                                       "4096; vm/nfactor.toml.example lists them); options given here "
                                       "override it.")


def node_options(command):
    """Decorate `up` with --config, one option per NodeConfig field it offers
    (in the fields' order, --testbed after --netns), then --foreground."""
    decorators = [config_file_option]
    for f in cli_fields():
        decorators.append(config_option(f))
        if f.name == "netns":
            decorators.append(testbed_option)
        if f.name == "hosts":
            decorators.append(worker_option)
    decorators.append(foreground_option)
    for decorate in reversed(decorators):
        command = decorate(command)
    return command


@click.command()
@node_options
@json_option
def up(testbed_name, worker, foreground, as_json, config_file, **settings):
    """Bring a node up on two interfaces.

    Loads the XDP switch (maps pinned, so a restarted node keeps its flows),
    creates one veth pair per runtime (sw-rtN/rtN), starts the runtimes and
    returns once every runtime is running.  Runs in the background unless
    --foreground.

    A node may span several hosts (--hosts, docs/architecture.md "Hosts"):
    this command on the ingress host, then `up --worker N` on each worker
    host with the same --hosts.  On a testbed made with `testbed up --hosts
    N`, `up --testbed NAME` brings up the ingress and every worker host.
    """
    from ..control import node_client as nodectl
    if config_file:
        settings = _with_file(settings, config_file)
    workers = []
    if testbed_name:
        from ..tools.testbed import Testbed
        with refusing(NFactorError, prefix=f"testbed {testbed_name!r}: "):
            show = Testbed.load(testbed_name).show()
        settings["netns"] = show["namespaces"]["node"]
        settings["ext0"] = show["node"]["ports"]["ext0"]["ifname"]
        settings["ext1"] = show["node"]["ports"]["ext1"]["ifname"]
        fab = show.get("fabric")
        if fab and not settings.get("hosts"):
            settings["hosts"] = ",".join(h["ipv4"] for h in fab["hosts"])
            settings["fabric_port"] = fab["hosts"][0]["ifname"]
        if fab and worker:
            settings["netns"] = fab["hosts"][worker]["netns"] if worker < len(fab["hosts"]) else None
        elif fab:
            workers = list(range(1, len(fab["hosts"])))
    if worker:
        from ..formats import fabric
        settings["host_id"] = worker
        settings["name"] = fabric.worker_name(settings["name"], worker)
    with refusing(NFactorError):
        cfg = NodeConfig(**settings).validate()
    if cfg.policy:
        from ..dataplane.rules import load_policy
        load_policy(cfg.policy)  # a bad policy is refused here, with its reason
    if foreground:
        from ..control.supervisor import run_foreground
        sys.exit(run_foreground(cfg))
    state = nodectl.start(cfg)
    states = [state]
    for h in workers:  # the testbed's worker hosts, each its own supervisor in its namespace
        states.append(nodectl.start_worker(cfg, h, show["fabric"]["hosts"][h]["netns"]))
    if as_json:
        emit_json(state if not workers else {**state, "workers": states[1:]})
        return
    for st in states:
        c = NodeConfig.from_dict(st["config"]) if st.get("config") else cfg
        rts = ", ".join(f"rt{r['id']} (core {r['core']}, pid {r['pid']})" for r in st["runtimes"])
        where = f"host {c.host_id}" if c.host_id else f"{c.ext0}/{c.ext1}"
        click.echo(f"node {c.name} up on {where}{' in ' + c.netns if c.netns else ''}: {rts}")


def _with_file(settings: dict, path: str) -> dict:
    """The file's settings under the options typed on the command line (by
    parameter source: an option not typed keeps the file's value, one typed
    wins even if it equals the default)."""
    from click.core import ParameterSource

    from ..formats import config_file
    ctx = click.get_current_context()
    given = {k for k in settings if ctx.get_parameter_source(k) not in (None, ParameterSource.DEFAULT)}
    return {**settings, **{k: v for k, v in config_file.read(path).items() if k not in given}}


@click.command()
@name_option
@click.option("--purge", is_flag=True, help="Also remove pins and state left by a crashed node.")
@json_option
def down(name, purge, as_json):
    """Stop a node and remove everything it made (programs, ports, pins, state)."""
    from ..control import node_client as nodectl
    removed = nodectl.stop(name, purge=purge)
    if as_json:
        emit_json({"node": name, "down": True, "cleaned_up_after_dead_supervisor": removed})
        return
    click.echo(f"node {name} down" + (f" (cleaned up after a dead agent: {len(removed)} items)" if removed else ""))


@click.command()
@name_option
@json_option
@click.option("--all-counters", is_flag=True, help="Show counters that are zero too.")
@click.option("--watch", is_flag=True, help="Refresh a live table (runtimes, flows, frames and their rates) until "
                                            "Ctrl-C; with --json, one JSON line per refresh.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, metavar="S",
              help="Seconds between two refreshes of --watch.")
def status(name, as_json, all_counters, watch, interval):
    """Runtimes (state, pid, core, packets, flows) and switch counters."""
    from ..control import node_client as nodectl
    if watch:
        _watch(name, as_json, interval)
        return
    st = nodectl.status(name)
    if as_json:
        emit_json(st)
        return
    cfg = st["config"] or {}
    click.echo(f"node {name}: {st['phase']} (supervisor pid {st['supervisor_pid']}"
               f"{'' if st['supervisor_alive'] else ', DEAD'}), ports {cfg.get('ext0')}/{cfg.get('ext1')}"
               f"{' in ' + cfg['netns'] if cfg.get('netns') else ''}, {st['switch_flows']} flows in the switch")
    _show_controller(st.get("controller", {}))
    _show_runtimes(st["runtimes"])
    _show_offload(st)
    click.echo("switch counters:")
    from ..kern.layouts import COUNTER_DOCS
    for k, v in st["switch"].items():
        if v or all_counters:
            click.echo(f"  {k:<20} {v:>12}   {COUNTER_DOCS.get(k, '')}")


def _watch(name: str, as_json: bool, interval: float) -> None:
    """The node's live table (or a JSON line) every `interval` seconds, until Ctrl-C."""
    import json
    import time
    from ..control import node_client as nodectl
    from ..tools import live
    screen, prev, last = live.Screen(click.echo), {}, None
    try:
        while True:
            st = nodectl.status(name)
            now = time.monotonic()
            if as_json:
                click.echo(json.dumps(st, default=str))
            else:
                screen.show(live.table(st, prev, 0.0 if last is None else now - last,
                                       f"node {name}: {st['phase']}, {time.strftime('%H:%M:%S')}"))
            last = now
            time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: not an error


def _show_controller(c: dict) -> None:
    if c.get("alive"):
        click.echo(f"controller: pid {c['pid']}, view v{c['view_version']}, {c['rules']} rules, "
                   f"{c['restarts']} restarts, {c['stats']['failures_detected']} failures detected, "
                   f"rejected frames {sum((c.get('rejected') or {}).values())}")
        store = c.get("log") or {}
        if store.get("store") == "etcd":
            click.echo(f"  state in etcd ({', '.join(store['endpoints'])}), talking to {store['talking_to']}; "
                       f"this controller leads as {store['me']} (lease {store['leader_ttl']} s)")
    else:
        click.echo(f"controller: NOT ANSWERING ({c.get('restarts', 0)} restarts)")
        why = (c.get("last_exit") or {}).get("why")
        if why:  # e.g. dying again and again: why, and when the next try is
            click.echo(f"controller: exited {c.get('quick_exits')} times in a row, next start in "
                       f"{c.get('restart_delay_s') or 0:.2f} s; last exit: {why}")


def _show_runtimes(runtimes: list[dict]) -> None:
    click.echo(f"{'rt':>3} {'host':>4} {'state':<9} {'switch':<9} {'pid':>7} {'core':>4} {'cpu':>5} {'flows':>7} "
               f"{'to rt':>10} {'from rt':>10} {'frames':>10} {'restarts':>8}")
    for r in runtimes:
        sw = r.get("switch", {})
        cpu = r.get("load", {}).get("cpu")
        click.echo(f"{r['id']:>3} {r.get('host') or 0:>4} {r['state']:<9} {r['switch_state']:<9} "
                   f"{r.get('pid') or '-':>7} {r.get('core', '-'):>4} "
                   f"{'-' if cpu is None else f'{cpu:.0%}':>5} "
                   f"{r.get('flows', '-') if r['live'] else '-':>7} {sw.get('to_rt_packets', 0):>10} "
                   f"{sw.get('from_rt_packets', 0):>10} {r.get('frames', '-') if r['live'] else '-':>10} "
                   f"{r.get('restarts', 0):>8}")
    for r in runtimes:
        rep = r.get("replication") or {}
        if not rep:
            continue
        rec = rep.get("recovery") or {}
        holding = sum((rep.get("holding") or {}).values())
        recovered = f" ({rec.get('actors')} flows in {rec.get('seconds')} s)" if rec.get("phase") == "done" else ""
        click.echo(f"rt{r['id']} replication: holding {holding} snapshots for its peers, sent "
                   f"{rep.get('snapshots_sent', 0)}, shed {rep.get('shed', 0)}; recovery {rec.get('phase')}{recovered}")
        took = r.get("takeover") or {}
        if took.get("peers"):
            left = {k: took[k] for k in ("offloaded", "elsewhere", "gone", "had_actor") if took.get(k)}
            click.echo(f"rt{r['id']} takeover: took {took.get('taken', 0)} flows of {took['peers']} crashed "
                       f"peer(s) (last in {took.get('seconds')} s)" + (f"; left {left}" if left else ""))
    for r in runtimes:
        _show_frames(r)


def _show_offload(st: dict) -> None:
    runtimes, sw = st["runtimes"], st.get("switch") or {}
    offloads = [r.get("offload") or {} for r in runtimes]
    if not any(o.get("enabled") for o in offloads):
        return
    click.echo(f"offload: {sum(o.get('flows', 0) for o in offloads)} flows in the switch, which forwarded "
               f"{sw.get('off_forward', 0)} frames and dropped {sw.get('off_drop', 0) + sw.get('off_bucket_drop', 0)} "
               f"on its own and punted {sw.get('off_punt', 0)} to the runtimes; "
               f"{sum(o.get('revoked', 0) for o in offloads)} flows taken back")
    observing = sum(o.get("observing", 0) for o in offloads)
    if observing or sw.get("off_observed") or sw.get("off_observe_lost"):
        click.echo(f"observe mode: {observing} flows observed, {sw.get('off_observed', 0)} copies to the "
                   f"runtimes, {sw.get('off_observe_lost', 0)} lost (a full observe ring; the frames were forwarded)")


def _show_frames(r: dict) -> None:
    """Where the runtime's frames went, and every limit that cost something."""
    if not r.get("live"):
        return
    held, dropped = r.get("held") or {}, r.get("dropped") or {}
    drops = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"
    click.echo(f"rt{r['id']} frames: {r.get('frames', 0)} received, {r.get('forwarded', 0)} forwarded, "
               f"{sum(held.values())} held (sent later: {r.get('sent_later', 0)}), {r.get('markers', 0)} markers; "
               f"dropped: {drops}")
    for name, lim in (r.get("limits") or {}).items():
        cost = {k: v for k, v in lim.items() if k not in ("limit", "unit") and v}
        if cost:
            what = ", ".join(f"{k} {v}" for k, v in cost.items())
            click.echo(f"rt{r['id']} limit {name} ({lim['limit']} {lim['unit']}) reached: {what}")


@click.command()
@name_option
@json_option
@click.option("--limit", type=int, default=None, help="Show at most this many flows.")
def flows(name, as_json, limit):
    """Flows: where the switch placed each one and what its actor counted."""
    from ..control import node_client as nodectl
    out = nodectl.flows(name, limit=limit)
    if as_json:
        emit_json(out)
        return
    click.echo(f"{'runtime':>7} {'pkts orig':>10} {'pkts reply':>10} {'dropped':>8}  {'offload':<8} {'chain':<36} flow")
    for f in out["flows"]:
        p = f["packets"] or {}
        rt = f["runtime"] if f["runtime"] is not None else f"({f['switch_runtime']})"
        if f.get("host"):  # on a worker host (a node with --hosts)
            rt = f"{rt}@h{f['host']}"
        chain = "->".join(f.get("chain") or []) or "-"
        off = (f.get("offload") or "-").split()[0]  # forward, drop (--json: punts, buckets, or why not)
        if "observe" in (f.get("offload") or ""):
            off = "observe"
        click.echo(f"{rt!s:>7} {p.get('orig', '-')!s:>10} {p.get('reply', '-')!s:>10} "
                   f"{f.get('dropped', '-')!s:>8}  {off:<8} {chain:<36} {f['flow']}")
    click.echo(f"{len(out['flows'])} flows")
    stuck = sum(1 for f in out["flows"] if f.get("migratable") is False)
    if stuck:
        click.echo(f"{stuck} of them cannot migrate: their state is larger than a migration carries (--json: "
                   f"state_bytes)")
