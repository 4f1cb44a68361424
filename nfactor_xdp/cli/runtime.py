"""nfactorctl runtime: add, stop, drain or kill a node's runtimes."""
from __future__ import annotations

import click

from .common import emit_json, json_option, name_option

id_option = click.option("--id", "rt_id", type=int, required=True, help="Runtime id.")


@click.group()
def runtime():
    """Operate on runtimes: add one, stop one for good, or kill one (failure injection)."""


def _call(name, to, msg, body) -> dict:
    """Send message `msg` to the node's `to` (supervisor or control) and return its reply."""
    from ..control import node_client as nodectl
    from ..formats.messages import MsgType
    return nodectl.control_call(name, to, getattr(MsgType, msg), body, timeout=2.0)


def _supervise(name, msg, body, what, as_json):
    reply = _call(name, "supervisor", msg, body)
    if as_json:
        emit_json({"node": name, "done": what, **reply})
    else:
        click.echo(f"{what} runtime {reply.get('id')}")


@runtime.command("add")
@name_option
@json_option
def runtime_add(name, as_json):
    """Start one more runtime (new port, next core); new flows start going to it."""
    _supervise(name, "RUNTIME_ADD", {}, "added", as_json)


@runtime.command("stop")
@name_option
@id_option
@json_option
def runtime_stop(name, rt_id, as_json):
    """Stop a runtime for good.  Its flows are placed anew (their NF state is lost
    until migration drains a runtime first)."""
    _supervise(name, "RUNTIME_STOP", {"id": rt_id}, "stopped", as_json)


@runtime.command("drain")
@name_option
@id_option
@json_option
def runtime_drain(name, rt_id, as_json):
    """Scale in: mark a runtime leaving (no new flows), migrate all its flows to
    the other runtimes, then stop and remove it."""
    reply = _call(name, "control", "RUNTIME_STOP", {"id": rt_id, "drain": True})
    if as_json:
        emit_json({"node": name, "done": "draining", "id": rt_id, **reply})
        return
    click.echo(f"runtime {rt_id} leaving: its flows are migrating away; it stops once empty")


@runtime.command("kill")
@name_option
@id_option
@json_option
def runtime_kill(name, rt_id, as_json):
    """kill -9 a runtime (failure injection): the controller marks it failed, its
    peers take its flows from their snapshots (--takeover on, the default; off: its
    flows wait for it), the supervisor restarts it and it rejoins as running."""
    _supervise(name, "RUNTIME_KILL", {"id": rt_id}, "killed", as_json)
