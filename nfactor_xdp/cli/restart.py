"""nfactorctl restart: a running node's processes restarted one at a time,
every flow and its NF state kept (how an upgrade is rolled out)."""
from __future__ import annotations

import click

from .common import CliError, emit_json, json_option, name_option


@click.command()
@name_option
@click.option("--all", "everything", is_flag=True,
              help="The supervisor, controller and switch agent, then every runtime, one at a time.")
@click.option("--supervisor", is_flag=True,
              help="Only the supervisor, controller and switch agent (and metrics endpoint): a new supervisor "
                   "takes the running runtimes over.")
@click.option("--runtime", "runtimes", type=int, multiple=True, metavar="ID",
              help="Replace this runtime (repeatable): its flows migrate to the others with their NF state, then "
                   "a fresh process takes its port.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds each step may take.")
@json_option
def restart(name, everything, supervisor, runtimes, timeout, as_json):
    """Restart a node's processes without losing a packet or any NF state.

    After upgrading the package, `nfactorctl restart --all` runs the new code
    everywhere: the supervisor re-executes itself and takes the node over
    (programs reloaded on the same pinned maps, controller and switch agent
    replaced, runtimes kept as they run), then each runtime in turn is
    drained (its flows migrate to the others, with their state) and started
    again on its port.  A runtime alone first gets a temporary peer to hold
    its flows.  Refused if the installed package's BPF ABI differs from the
    node's pins (see docs/architecture.md, Restarts and upgrades).
    """
    from ..control import restart as rolling
    if not (everything or supervisor or runtimes):
        raise CliError("say what to restart: --all, --supervisor or --runtime ID")

    def progress(step: dict) -> None:
        if as_json:
            return
        if "supervisor" in step:
            s = step["supervisor"]
            a = s.get("adoption") or {}
            click.echo(f"supervisor pid {s['pid']} took the node over: runtimes {a.get('adopted')} kept"
                       f"{', ' + str(a['restarted']) + ' started again' if a.get('restarted') else ''}; "
                       f"controller pid {s['controller_pid']}, switch agent pid {s['switch_agent_pid']}")
        else:
            r = step["runtime"]
            via = f" (through temporary runtime {r['through']})" if "through" in r else ""
            click.echo(f"runtime {r['id']}: pid {r['old_pid']} -> {r['new_pid']}, {r['flows']} flows migrated "
                       f"away{via}, {r['seconds']} s")

    report = rolling.restart(name, list(runtimes), supervisor, everything, timeout, progress)
    if as_json:
        emit_json(report)
