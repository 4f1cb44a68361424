"""nfactorctl: run and inspect an NFActor-XDP node.

A node is a bump in the wire between two interfaces, ext0 and ext1.  An XDP
virtual switch on both keeps a flow table in BPF maps and steers every TCP/UDP
flow to one of N Python runtimes (one per core, AF_XDP sockets); processed
frames leave by the opposite interface.
"""
from __future__ import annotations

import json
import os
import sys

import click

from ..kern import layouts as L
from ..errors import NFactorError
from ..formats.config import DEFAULT_NODE, NodeConfig


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _write_result(result: dict, output: str) -> bool:
    """Write a benchmark's JSON to `output` ('-': stdout); True if a file was written."""
    text = json.dumps(result, indent=2)
    if output == "-":
        click.echo(text)
        return False
    with open(output, "w") as f:
        f.write(text + "\n")
    click.echo(f"wrote {output}")
    return True


def _int_list(value: str, what: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers", param_hint=what) from None


def _cores(value: str | None) -> list[int]:
    if not value:
        return []
    try:
        return [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter("a comma-separated list of CPU numbers, e.g. 0,1") from None


name_option = click.option("--name", "-n", default=DEFAULT_NODE, show_default=True,
                           help="Node name (pins under /sys/fs/bpf/nfactor/NAME, state under /run/nfactor/NAME).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Run and inspect an NFActor-XDP node (XDP virtual switch + Python actor runtimes).

    \b
    Quick start on the built-in testbed:
      nfactorctl demo                      # everything, for ten seconds, then cleaned up
    or step by step:
      nfactorctl testbed up                # source and sink hosts in namespaces
      nfactorctl up --testbed nfx          # the node on the testbed's ext0/ext1
      nfactorctl status                    # runtimes, flows, switch counters
      nfactorctl down && nfactorctl testbed down
    """


@main.command()
@name_option
@click.option("--ext0", default="ext0", show_default=True, help="External port 0 (towards the sources).")
@click.option("--ext1", default="ext1", show_default=True, help="External port 1 (towards the sinks).")
@click.option("--netns", help="Network namespace holding ext0/ext1 (default: this one).")
@click.option("--testbed", "testbed_name", metavar="NAME",
              help="Run on testbed NAME's node namespace and ports (see `nfactorctl testbed`).")
@click.option("--runtimes", "-r", default=2, show_default=True, help="Number of runtime processes.")
@click.option("--cores", help="CPUs for the runtimes, in turn (default: all CPUs in turn), e.g. 0,1.")
@click.option("--other", "other_action", type=click.Choice(sorted(L.OTHER_ACTIONS)), default="forward",
              show_default=True, help="What the switch does with non-TCP/UDP traffic (ARP, ICMP, non-IP, VLAN).")
@click.option("--flow-table-size", default=262144, show_default=True, help="Entries in the switch's LRU flow table.")
@click.option("--xdp-mode", type=click.Choice(["native", "generic", "auto"]), default="native", show_default=True,
              help="XDP attach mode; auto falls back to generic where native is unsupported.")
@click.option("--idle-timeout", default=30.0, show_default=True, help="Seconds before an idle flow's actor is released.")
@click.option("--policy", type=click.Path(exists=True, dir_okay=False),
              help="Policy file (service chain rules, NF config) to install; default: the node's saved one.")
@click.option("--heartbeat", default=0.1, show_default=True, help="Seconds between runtime heartbeats.")
@click.option("--miss-limit", default=3, show_default=True, help="Missed heartbeats before a runtime is failed.")
@click.option("--max-runtimes", default=0, show_default=True,
              help="Scale out up to this many runtimes when overloaded (0: no scale-out).")
@click.option("--scale-threshold", default=0.8, show_default=True,
              help="Average runtime CPU load (0-1) that triggers scale-out after --scale-window seconds.")
@click.option("--scale-window", default=2.0, show_default=True, help="Seconds the overload (or idleness) must last.")
@click.option("--scale-in-threshold", default=0.0, show_default=True,
              help="Average runtime CPU load (0-1) under which the least loaded runtime is drained (0: off).")
@click.option("--min-runtimes", default=1, show_default=True, help="Scale-in never goes below this.")
@click.option("--migrate-threshold", default=0.0, show_default=True,
              help="A runtime over this CPU load (0-1) for a second migrates a fifth of its flows to the least "
                   "loaded runtime (0: off).")
@click.option("--max-migrations", default=1000, show_default=True, help="Concurrent migrations per runtime.")
@click.option("--snapshot-every", default=10, show_default=True,
              help="K: a flow's NF state is replicated to a peer every K packets (0: no replication).")
@click.option("--foreground", is_flag=True, help="Run the supervisor in this process until Ctrl-C (systemd).")
def up(name, ext0, ext1, netns, testbed_name, runtimes, cores, other_action, flow_table_size, xdp_mode,
       idle_timeout, policy, heartbeat, miss_limit, max_runtimes, scale_threshold, scale_window,
       scale_in_threshold, min_runtimes, migrate_threshold, max_migrations, snapshot_every, foreground):
    """Bring a node up on two interfaces.

    Loads the XDP switch (maps pinned, so a restarted node keeps its flows),
    creates one veth pair per runtime (sw-rtN/rtN), starts the runtimes and
    returns once every runtime is running.  Runs in the background unless
    --foreground.
    """
    from ..control import node_client as nodectl
    if testbed_name:
        from ..tools.testbed import Testbed
        try:
            tb = Testbed.load(testbed_name)
        except Exception as e:
            _fail(f"testbed {testbed_name!r}: {e}")
        show = tb.show()
        netns = show["namespaces"]["node"]
        ext0 = show["node"]["ports"]["ext0"]["ifname"]
        ext1 = show["node"]["ports"]["ext1"]["ifname"]
    cfg = NodeConfig(name=name, ext0=ext0, ext1=ext1, netns=netns, runtimes=runtimes, cores=_cores(cores),
                     other_action=other_action, flow_table_size=flow_table_size, xdp_mode=xdp_mode,
                     idle_timeout=idle_timeout, policy=os.path.abspath(policy) if policy else None,
                     heartbeat=heartbeat, miss_limit=miss_limit, max_runtimes=max_runtimes,
                     scale_threshold=scale_threshold, scale_window=scale_window,
                     scale_in_threshold=scale_in_threshold, min_runtimes=min_runtimes,
                     migrate_threshold=migrate_threshold, max_migrations=max_migrations,
                     snapshot_every=snapshot_every)
    try:
        cfg.validate()
        if policy:
            from ..dataplane.rules import load_policy
            load_policy(policy)  # a bad policy is refused here, with its reason
        if foreground:
            from ..control.supervisor import run_foreground
            sys.exit(run_foreground(cfg))
        state = nodectl.start(cfg)
    except (NFactorError, OSError, RuntimeError, ValueError) as e:
        _fail(str(e))
    rts = ", ".join(f"rt{r['id']} (core {r['core']}, pid {r['pid']})" for r in state["runtimes"])
    click.echo(f"node {name} up on {ext0}/{ext1}{' in ' + netns if netns else ''}: {rts}")


@main.command()
@name_option
@click.option("--purge", is_flag=True, help="Also remove pins and state left by a crashed node.")
def down(name, purge):
    """Stop a node and remove everything it made (programs, ports, pins, state)."""
    from ..control import node_client as nodectl
    try:
        removed = nodectl.stop(name, purge=purge)
    except (NFactorError, OSError, RuntimeError) as e:
        _fail(str(e))
    click.echo(f"node {name} down" + (f" (cleaned up after a dead agent: {len(removed)} items)" if removed else ""))


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all-counters", is_flag=True, help="Show counters that are zero too.")
def status(name, as_json, all_counters):
    """Runtimes (state, pid, core, packets, flows) and switch counters."""
    from ..control import node_client as nodectl
    try:
        st = nodectl.status(name)
    except (nodectl.NodeCtlError, OSError) as e:
        _fail(str(e))
    if as_json:
        _emit_json(st)
        return
    cfg = st["config"] or {}
    click.echo(f"node {name}: {st['phase']} (supervisor pid {st['agent_pid']}"
               f"{'' if st['agent_alive'] else ', DEAD'}), ports {cfg.get('ext0')}/{cfg.get('ext1')}"
               f"{' in ' + cfg['netns'] if cfg.get('netns') else ''}, {st['switch_flows']} flows in the switch")
    c = st.get("controller", {})
    if c.get("alive"):
        click.echo(f"controller: pid {c['pid']}, view v{c['view_version']}, {c['rules']} rules, "
                   f"{c['restarts']} restarts, {c['stats']['failures_detected']} failures detected, "
                   f"rejected frames {sum((c.get('rejected') or {}).values())}")
    else:
        click.echo(f"controller: NOT ANSWERING ({c.get('restarts', 0)} restarts)")
    click.echo(f"{'rt':>3} {'state':<9} {'switch':<9} {'pid':>7} {'core':>4} {'cpu':>5} {'flows':>7} {'to rt':>10} "
               f"{'from rt':>10} {'frames':>10} {'restarts':>8}")
    for r in st["runtimes"]:
        sw = r.get("switch", {})
        cpu = r.get("load", {}).get("cpu")
        click.echo(f"{r['id']:>3} {r['state']:<9} {r['switch_state']:<9} {r.get('pid') or '-':>7} {r['core']:>4} "
                   f"{'-' if cpu is None else f'{cpu:.0%}':>5} "
                   f"{r.get('flows', '-') if r['live'] else '-':>7} {sw.get('to_rt_packets', 0):>10} "
                   f"{sw.get('from_rt_packets', 0):>10} {r.get('frames', '-') if r['live'] else '-':>10} "
                   f"{r.get('restarts', 0):>8}")
    for r in st["runtimes"]:
        rep = r.get("replication") or {}
        if not rep:
            continue
        rec = rep.get("recovery") or {}
        holding = sum((rep.get("holding") or {}).values())
        recovered = f" ({rec.get('actors')} flows in {rec.get('seconds')} s)" if rec.get("phase") == "done" else ""
        click.echo(f"rt{r['id']} replication: holding {holding} snapshots for its peers, sent "
                   f"{rep.get('snapshots_sent', 0)}, shed {rep.get('shed', 0)}; recovery {rec.get('phase')}{recovered}")
    click.echo("switch counters:")
    for k, v in st["switch"].items():
        if v or all_counters:
            click.echo(f"  {k:<20} {v:>12}   {L.COUNTER_DOCS.get(k, '')}")


@main.command()
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--limit", type=int, default=None, help="Show at most this many flows.")
def flows(name, as_json, limit):
    """Flows: where the switch placed each one and what its actor counted."""
    from ..control import node_client as nodectl
    try:
        out = nodectl.flows(name, limit=limit)
    except (nodectl.NodeCtlError, OSError) as e:
        _fail(str(e))
    if as_json:
        _emit_json(out)
        return
    click.echo(f"{'runtime':>7} {'pkts orig':>10} {'pkts reply':>10} {'dropped':>8}  {'chain':<36} flow")
    for f in out["flows"]:
        p = f["packets"] or {}
        rt = f["runtime"] if f["runtime"] is not None else f"({f['switch_runtime']})"
        chain = "->".join(f.get("chain") or []) or "-"
        click.echo(f"{rt!s:>7} {p.get('orig', '-')!s:>10} {p.get('reply', '-')!s:>10} "
                   f"{f.get('dropped', '-')!s:>8}  {chain:<36} {f['flow']}")
    click.echo(f"{len(out['flows'])} flows")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probe(as_json):
    """Check every kernel and system feature the node needs; say what is missing."""
    from ..tools.probe import run_probe
    checks = run_probe()
    if as_json:
        _emit_json(checks)
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else "MISSING"
            click.echo(f"{mark:<8} {c['check']:<24} {c['detail']}")
            if not c["ok"] and c["hint"]:
                click.echo(f"{'':<8} {'':<24} -> {c['hint']}")
    sys.exit(0 if all(c["ok"] for c in checks) else 1)


@main.group()
def rules():
    """Service chain rules: which NFs a new flow goes through (longest prefix match).

    \b
    A rule matches a flow's first packet: source/destination prefixes,
    protocol, source/destination port or range, each 'any' by default.
    The chain is a comma-separated list of NFs, first NF first:
      nfactorctl rules add --proto tcp --dport 80 --chain flow_monitor,firewall,http_parser
    Rules apply to new flows; existing flows keep their chain.
    """


def _rules_done(name, policy, what):
    from ..control import node_client as nodectl
    took = nodectl.put_policy(name, policy)
    click.echo(f"{what}; {'pushed to runtimes ' + ', '.join(map(str, took)) if took else 'saved (node not running)'}")


@rules.command("list")
@name_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rules_list(name, as_json):
    """The node's rules, most specific first, and the default chain."""
    from ..dataplane import nf
    from ..control import node_client as nodectl
    try:
        policy = nodectl.get_policy(name)
    except ValueError as e:
        _fail(str(e))
    table = policy.table()
    rows = [r.to_dict() for r in table.rules]
    if as_json:
        _emit_json({"rules": rows, "default_chain": nf.chain_names(policy.default_chain),
                    "nfs": nf.known()})
        return
    click.echo(f"{'id':>3} {'src':<18} {'dst':<18} {'proto':<5} {'sport':<11} {'dport':<11} chain")
    for r in rows:
        click.echo(f"{r['id']:>3} {r['src']:<18} {r['dst']:<18} {r['proto']:<5} {r['sport']:<11} "
                   f"{r['dport']:<11} {'->'.join(r['chain']) or '(none)'}")
    click.echo(f"default chain: {'->'.join(nf.chain_names(policy.default_chain)) or '(none: pass through)'}")


@rules.command("add")
@name_option
@click.option("--src", default="any", show_default=True, help="Source prefix (the flow's first sender).")
@click.option("--dst", default="any", show_default=True, help="Destination prefix.")
@click.option("--proto", default="any", show_default=True, help="tcp, udp or any.")
@click.option("--sport", default="any", show_default=True, help="Source port or range (1000-2000).")
@click.option("--dport", default="any", show_default=True, help="Destination port or range.")
@click.option("--chain", required=True, help="NFs in order, comma-separated (see `rules list --json`).")
def rules_add(name, src, dst, proto, sport, dport, chain):
    """Add a rule."""
    from ..control import node_client as nodectl
    from ..dataplane.rules import RuleError
    try:
        policy = nodectl.get_policy(name)
        rule = policy.add({"src": src, "dst": dst, "proto": proto, "sport": sport, "dport": dport,
                           "chain": chain})
    except (RuleError, ValueError) as e:
        _fail(str(e))
    _rules_done(name, policy, f"rule {rule.id} added")


@rules.command("del")
@name_option
@click.argument("rule_id", type=int)
def rules_del(name, rule_id):
    """Delete rule RULE_ID."""
    from ..control import node_client as nodectl
    from ..dataplane.rules import RuleError
    try:
        policy = nodectl.get_policy(name)
        policy.delete(rule_id)
    except (RuleError, ValueError) as e:
        _fail(str(e))
    _rules_done(name, policy, f"rule {rule_id} deleted")


@rules.command("default")
@name_option
@click.option("--chain", required=True, help="NFs for flows no rule matches ('' for none).")
def rules_default(name, chain):
    """Set the chain of flows that no rule matches."""
    from ..control import node_client as nodectl
    from ..dataplane.rules import RuleError, parse_chain
    try:
        policy = nodectl.get_policy(name)
        policy.default_chain = parse_chain(chain, "--chain")
    except (RuleError, ValueError) as e:
        _fail(str(e))
    _rules_done(name, policy, "default chain set")


@rules.command("load")
@name_option
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
def rules_load(name, policy_file):
    """Replace the node's whole policy (rules, default chain, NF config) from a JSON file."""
    from ..dataplane.rules import RuleError, load_policy
    try:
        policy = load_policy(policy_file)
    except RuleError as e:
        _fail(str(e))
    _rules_done(name, policy, f"policy loaded ({len(policy.rules)} rules)")


@main.command()
@name_option
@click.option("--from", "src", type=int, required=True, help="Source runtime id.")
@click.option("--to", "dst", type=int, required=True, help="Target runtime id.")
@click.option("--all", "all_flows", is_flag=True, help="Every flow of the source runtime.")
@click.option("--count", type=int, help="This many of its flows.")
@click.option("--flow", "flows_", multiple=True,
              help="A flow: 'udp 10.77.0.1:5000 10.77.0.2:9000' (either direction) or its key in hex; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def migrate(name, src, dst, all_flows, count, flows_, as_json):
    """Move flows between runtimes while traffic flows (paper 5: three passes with a
    data-plane marker; no packet lost, none processed twice, order kept).

    Returns when every migration has finished."""
    from ..control import node_client as nodectl
    if sum(bool(x) for x in (all_flows, count is not None, flows_)) != 1:
        _fail("say which flows: --all, --count N or --flow KEY")
    from ..dataplane.packet import parse_flow
    try:
        keys = [parse_flow(f).hex() for f in flows_] or None
        report = nodectl.migrate(name, src, dst, count=count, keys=keys)
    except (nodectl.NodeCtlError, ValueError) as e:
        _fail(str(e))
    if as_json:
        _emit_json(report)
        return
    click.echo(f"{report['succeeded']} migrated, {report['failed']} failed, {report['retried']} retried, "
               f"of {report['total']} flows from runtime {src} to {dst} in {report['seconds'] * 1000:.1f} ms "
               f"({report['avg_flow_us']:.0f} us per flow on average)")
    if report["failed"]:
        click.echo(f"last error: {report.get('last_error')}")
        sys.exit(2)


@main.group()
def runtime():
    """Operate on runtimes: add one, stop one for good, or kill one (failure injection)."""


def _runtime_call(name, msg, body, what):
    from ..control import node_client as nodectl
    from ..formats.messages import MsgType
    try:
        reply = nodectl.control_call(name, "supervisor", getattr(MsgType, msg), body, timeout=2.0)
    except nodectl.NodeCtlError as e:
        _fail(str(e))
    click.echo(f"{what} runtime {reply.get('id')}")


@runtime.command("add")
@name_option
def runtime_add(name):
    """Start one more runtime (new port, next core); new flows start going to it."""
    _runtime_call(name, "RUNTIME_ADD", {}, "added")


@runtime.command("stop")
@name_option
@click.option("--id", "rt_id", type=int, required=True, help="Runtime id.")
def runtime_stop(name, rt_id):
    """Stop a runtime for good.  Its flows are placed anew (their NF state is lost
    until migration drains a runtime first)."""
    _runtime_call(name, "RUNTIME_STOP", {"id": rt_id}, "stopped")


@runtime.command("drain")
@name_option
@click.option("--id", "rt_id", type=int, required=True, help="Runtime id.")
def runtime_drain(name, rt_id):
    """Scale in: mark a runtime leaving (no new flows), migrate all its flows to
    the other runtimes, then stop and remove it."""
    from ..control import node_client as nodectl
    from ..formats.messages import MsgType
    try:
        nodectl.control_call(name, "control", MsgType.RUNTIME_STOP, {"id": rt_id, "drain": True}, timeout=2.0)
    except nodectl.NodeCtlError as e:
        _fail(str(e))
    click.echo(f"runtime {rt_id} leaving: its flows are migrating away; it stops once empty")


@runtime.command("kill")
@name_option
@click.option("--id", "rt_id", type=int, required=True, help="Runtime id.")
def runtime_kill(name, rt_id):
    """kill -9 a runtime (failure injection): the controller marks it failed, the
    supervisor restarts it, it rejoins as running."""
    _runtime_call(name, "RUNTIME_KILL", {"id": rt_id}, "killed")


@main.group()
def testbed():
    """The built-in testbed: source and sink hosts in namespaces around the node's ports."""


@testbed.command("up")
@click.option("--name", "-n", default="nfx", show_default=True, help="Testbed name (prefix of its namespaces).")
def testbed_up(name):
    """Create namespaces NAME-src, NAME-dst (hosts) and NAME-node (ext0, ext1)."""
    from ..tools.testbed import Testbed, TestbedConfig
    try:
        tb = Testbed(TestbedConfig(name=name))
        tb.up()
    except Exception as e:
        _fail(str(e))
    s = tb.show()
    click.echo(f"testbed {name} up: {s['hosts']['src']['netns']} ({s['hosts']['src']['ipv4']}) -> "
               f"{s['namespaces']['node']} [ext0, ext1] -> {s['hosts']['dst']['netns']} "
               f"({s['hosts']['dst']['ipv4']})\nnext: nfactorctl up --testbed {name}")


@testbed.command("down")
@click.option("--name", "-n", default="nfx", show_default=True, help="Testbed name.")
def testbed_down(name):
    """Remove the testbed's namespaces (and every interface in them)."""
    from ..tools.testbed import Testbed, TestbedConfig
    removed = Testbed(TestbedConfig(name=name)).down()
    click.echo(f"testbed {name} down ({', '.join(removed) if removed else 'nothing to remove'})")


@testbed.command("show")
@click.option("--name", "-n", default="nfx", show_default=True, help="Testbed name.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def testbed_show(name, as_json):
    """Namespaces, interfaces, addresses and MACs needed to send traffic."""
    from ..tools.testbed import Testbed, TestbedConfig
    try:
        s = Testbed.load(name).show()
    except Exception:
        s = Testbed(TestbedConfig(name=name)).show()
    if as_json:
        _emit_json(s)
        return
    if not s.get("up"):
        _fail(f"testbed {name} is not up (nfactorctl testbed up --name {name})")
    for role in ("src", "dst"):
        h = s["hosts"][role]
        click.echo(f"{role}: netns {h['netns']} {h['ifname']} {h['mac']} {h['ipv4']} {h['ipv6']}")
    for port, p in s["node"]["ports"].items():
        click.echo(f"node: netns {s['node']['netns']} {port}: {p['ifname']} {p['mac']}")
    click.echo(f"try: ip netns exec {s['hosts']['src']['netns']} ping {s['hosts']['dst']['ipv4'].split('/')[0]}")


@main.command()
@click.option("--runtimes", "-r", default=2, show_default=True, help="Runtimes to start.")
@click.option("--duration", "-d", default=10.0, show_default=True, help="Seconds of traffic.")
@click.option("--udp-flows", default=200, show_default=True, help="UDP flows to send.")
@click.option("--tcp-flows", default=100, show_default=True, help="TCP connections to make.")
@click.option("--name", "-n", default="demo", show_default=True, help="Name for the demo's testbed and node.")
def demo(runtimes, duration, udp_flows, tcp_flows, name):
    """Testbed up, node up, TCP and UDP flows with a live table, summary, all down."""
    from ..tools.demo import run_demo
    sys.exit(run_demo(name=name, runtimes=runtimes, duration=duration, udp_flows=udp_flows,
                      tcp_flows=tcp_flows))


@main.group()
def bench():
    """Benchmarks; each writes its figures as JSON."""


@bench.command("forward")
@click.option("--runtimes", default="1,2", show_default=True, help="Runtime counts to measure, comma-separated.")
@click.option("--duration", default=5.0, show_default=True, help="Seconds per measurement.")
@click.option("--flows", "nflows", default=64, show_default=True, help="Flows in the offered load.")
@click.option("--size", default=64, show_default=True, help="Frame size in bytes.")
@click.option("--batch", default=64, show_default=True, help="Frames a runtime takes per loop iteration.")
@click.option("--output", "-o", default="bench-forward.json", show_default=True, help="JSON output file ('-' for stdout).")
def bench_forward(runtimes, duration, nflows, size, batch, output):
    """Pass-through rate with 1 and 2 runtimes and the XDP-only ceiling, same run."""
    from ..tools.bench import run_forward_bench
    counts = _int_list(runtimes, "--runtimes")
    result = run_forward_bench(counts, duration=duration, flows=nflows, size=size, batch=batch)
    if _write_result(result, output):
        for m in result["measurements"]:
            click.echo(f"  {m['label']:<22} {m['forwarded_mpps']:.3f} Mpps forwarded "
                       f"({m['ratio_to_ceiling']:.1%} of ceiling), offered {m['offered_mpps']:.3f} Mpps")


@bench.command("chains")
@click.option("--runtimes", default="1,2", show_default=True, help="Runtime counts to measure, comma-separated.")
@click.option("--trial", default=1.0, show_default=True, help="Seconds per trial of the zero-loss search.")
@click.option("--steps", default=7, show_default=True, help="Binary search steps per chain.")
@click.option("--output", "-o", default="bench-chains.json", show_default=True, help="JSON output file ('-' for stdout).")
def bench_chains(runtimes, trial, steps, output):
    """Zero-loss rate per service chain (each NF alone, all three) with 1 and 2 runtimes (paper Fig. 6a)."""
    from ..tools.bench import run_chain_bench
    counts = _int_list(runtimes, "--runtimes")
    result = run_chain_bench(counts, trial=trial, steps=steps)
    if _write_result(result, output):
        for m in result["measurements"]:
            click.echo(f"  {m['label']:<52} zero-loss {m['zero_loss_mpps']:.3f} Mpps "
                       f"(max forwarded {m['max_forwarded_mpps']:.3f})")



@bench.command("migration")
@click.option("--flows", "flow_counts", default="100,1000,10000", show_default=True,
              help="Flow counts (Fig. 7), comma-separated.")
@click.option("--rates", default="10,50,100", show_default=True, help="Packets/s per flow (Fig. 7), comma-separated.")
@click.option("--caps", default="100,500,1000,2000", show_default=True,
              help="Caps on concurrent migrations per runtime (Fig. 8), comma-separated.")
@click.option("--cap-flows", default=2000, show_default=True, help="Flows for the cap measurements (at 10 pps each).")
@click.option("--max-offered", type=float, default=None,
              help="Skip trials offering more frames/s than this (default: what 2 runtimes carry, measured, "
                   "at most 150000).")
@click.option("--output", "-o", default="bench-migration.json", show_default=True,
              help="JSON output file ('-' for stdout).")
def bench_migration(flow_counts, rates, caps, cap_flows, max_offered, output):
    """Migrate every flow of runtime 0 to runtime 1 under live traffic: time per flow and
    per batch by flow count and rate, and by concurrency cap (paper Fig. 7-8)."""
    from ..tools.bench import run_migration_bench

    result = run_migration_bench(flow_counts=_int_list(flow_counts, "--flows"), rates=_int_list(rates, "--rates"),
                                 caps=_int_list(caps, "--caps"), cap_flows=cap_flows, max_offered_pps=max_offered)
    if not _write_result(result, output):
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
@click.option("--runtimes", default="1,2", show_default=True, help="Runtime counts for the throughput, comma-separated.")
@click.option("--flows", "flow_counts", default="1000,10000,50000", show_default=True,
              help="Flow counts for the recovery time, comma-separated.")
@click.option("--output", "-o", default="bench-replication.json", show_default=True,
              help="JSON output file ('-' for stdout).")
def bench_replication(runtimes, flow_counts, output):
    """Throughput with and without state snapshots every 10 packets, and the recovery time
    of a runtime killed with -9, by flow count (paper Fig. 10)."""
    from ..tools.bench import run_replication_bench

    result = run_replication_bench(counts=_int_list(runtimes, "--runtimes"), flow_counts=_int_list(flow_counts, "--flows"))
    if not _write_result(result, output):
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
    p = result["paper_reference"]
    click.echo(f"  paper: {p['throughput_lost_ratio']:.0%} throughput lost, recovery {p['recovery_total_s']} s "
               f"({p['recovery_fetch_replay_s']} s fetching/replaying)")

if __name__ == "__main__":
    main()
