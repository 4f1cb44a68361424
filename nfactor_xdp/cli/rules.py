"""nfactorctl rules: the service chain rules of a node."""
from __future__ import annotations

import click

from ..formats.config import policy_path
from .common import emit_json, json_option, name_option


@click.group()
def rules():
    """Service chain rules: which NFs a new flow goes through (longest prefix match).

    \b
    A rule matches a flow's first packet: source/destination prefixes,
    protocol, source/destination port or range, each 'any' by default.
    The chain is a comma-separated list of NFs, first NF first:
      nfactorctl rules add --proto tcp --dport 80 --chain flow_monitor,firewall,http_parser
    Rules apply to new flows; existing flows keep their chain.
    """


def _edit(name, as_json, change):
    """Apply `change` to node `name`'s policy, then save it and hand it to the
    node's controller if the node is up.  `change` returns what to say, and
    for --json a dict of what it did."""
    from ..control import node_client as nodectl
    policy = nodectl.get_policy(name)
    _install(name, policy, *change(policy), as_json)


def _install(name, policy, what, done, as_json):
    from ..control import node_client as nodectl
    took = nodectl.put_policy(name, policy)
    if as_json:
        emit_json({"node": name, **done, "saved": policy_path(name), "pushed_to": took})
        return
    click.echo(f"{what}; {'pushed to runtimes ' + ', '.join(map(str, took)) if took else 'saved (node not running)'}")


@rules.command("list")
@name_option
@json_option
def rules_list(name, as_json):
    """The node's rules, most specific first, and the default chain."""
    from ..dataplane import nf
    from ..control import node_client as nodectl
    policy = nodectl.get_policy(name)
    rows = [r.to_dict() for r in policy.table().rules]
    if as_json:
        emit_json({"rules": rows, "default_chain": nf.chain_names(policy.default_chain),
                   "default_observe": policy.default_observe, "fragments": policy.fragments, "nfs": nf.known()})
        return
    click.echo(f"{'id':>3} {'src':<18} {'dst':<18} {'proto':<5} {'sport':<11} {'dport':<11} chain")
    for r in rows:
        click.echo(f"{r['id']:>3} {r['src']:<18} {r['dst']:<18} {r['proto']:<5} {r['sport']:<11} "
                   f"{r['dport']:<11} {'->'.join(r['chain']) or '(none)'}{' (observe)' if r['observe'] else ''}")
    click.echo(f"default chain: {'->'.join(nf.chain_names(policy.default_chain)) or '(none: pass through)'}"
               f"{' (observe)' if policy.default_observe else ''}")
    click.echo(f"IP fragments: {policy.fragments}")


@rules.command("add")
@name_option
@click.option("--src", default="any", show_default=True, help="Source prefix (the flow's first sender).")
@click.option("--dst", default="any", show_default=True, help="Destination prefix.")
@click.option("--proto", default="any", show_default=True,
              help="tcp, udp, gre, esp, ah, sctp, ipip, ipv6, ..., a protocol number, or any.")
@click.option("--sport", default="any", show_default=True, help="Source port or range (1000-2000).")
@click.option("--dport", default="any", show_default=True, help="Destination port or range.")
@click.option("--chain", required=True, help="NFs in order, comma-separated (see `rules list --json`).")
@click.option("--observe/--inline", default=False, show_default=True,
              help="Observe mode: NFs of the chain that only observe (http_parser) are fed copies of the "
                   "flow's frames while the switch forwards them in XDP (docs/offload.md); inline: they see "
                   "every frame in Python.  Needs offload on.")
@json_option
def rules_add(name, src, dst, proto, sport, dport, chain, observe, as_json):
    """Add a rule."""
    def add(policy):
        rule = policy.add({"src": src, "dst": dst, "proto": proto, "sport": sport, "dport": dport,
                           "chain": chain, "observe": observe})
        return f"rule {rule.id} added", {"added": rule.to_dict()}
    _edit(name, as_json, add)


@rules.command("del")
@name_option
@click.argument("rule_id", type=int)
@json_option
def rules_del(name, rule_id, as_json):
    """Delete rule RULE_ID."""
    def delete(policy):
        policy.delete(rule_id)
        return f"rule {rule_id} deleted", {"deleted": rule_id}
    _edit(name, as_json, delete)


@rules.command("default")
@name_option
@click.option("--chain", required=True, help="NFs for flows no rule matches ('' for none).")
@click.option("--observe/--inline", default=False, show_default=True,
              help="Observe mode: NFs of the chain that only observe (http_parser) are fed copies of the "
                   "flow's frames while the switch forwards them in XDP (docs/offload.md); inline: they see "
                   "every frame in Python.  Needs offload on.")
@json_option
def rules_default(name, chain, observe, as_json):
    """Set the chain of flows that no rule matches."""
    from ..dataplane import nf
    from ..dataplane.rules import parse_chain

    def set_default(policy):
        policy.default_chain = parse_chain(chain, "--chain")
        policy.default_observe = observe
        return "default chain set", {"default_chain": nf.chain_names(policy.default_chain),
                                     "default_observe": observe}
    _edit(name, as_json, set_default)


@rules.command("fragments")
@name_option
@click.argument("mode", type=click.Choice(["reassemble", "drop"]))
@json_option
def rules_fragments(name, mode, as_json):
    """What runtimes do with IP fragments: reassemble them so the chain sees
    each datagram with its real ports (default), or drop them all."""
    def set_mode(policy):
        policy.fragments = mode
        return f"IP fragments: {mode}", {"fragments": mode}
    _edit(name, as_json, set_mode)


@rules.command("load")
@name_option
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False))
@json_option
def rules_load(name, policy_file, as_json):
    """Replace the node's whole policy (rules, default chain, NF config) from a JSON file."""
    from ..dataplane.rules import load_policy
    policy = load_policy(policy_file)
    _install(name, policy, f"policy loaded ({len(policy.rules)} rules)",
             {"loaded": policy_file, "rules": len(policy.rules)}, as_json)
