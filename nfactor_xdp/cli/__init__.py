"""nfactorctl: run and inspect an NFActor-XDP node.

A node is a bump in the wire between two interfaces, ext0 and ext1.  An XDP
virtual switch on both keeps a flow table in BPF maps and steers every TCP/UDP
flow to one of N Python runtimes (one per core, AF_XDP sockets); processed
frames leave by the opposite interface.

Each command group is a module of this package (node, rules, migrate,
runtime, restart, testbed, bench, demo, probe, fuzz), imported only when that
command runs or help lists it; the modules import the layers below (tools, control, ...)
inside their commands.  Exit codes are decided here, in NodeCtl.invoke.
"""
from __future__ import annotations

import errno
import importlib
import importlib.metadata

import click

from ..errors import NFactorError

EXIT_OK = 0
EXIT_ERROR = 1  # an NFactorError or OSError: `error: <message>` on stderr
EXIT_USAGE = 2  # click's usage errors (bad command, option or value)
EXIT_PARTIAL = 3  # the command did part of its work: some flows did not move, traffic was lost

# command name -> module of this package that defines it (as an attribute of that name)
COMMANDS = {
    "up": "node", "down": "node", "status": "node", "flows": "node",
    "rules": "rules", "migrate": "migrate", "runtime": "runtime", "restart": "restart",
    "testbed": "testbed", "bench": "bench", "demo": "demo", "probe": "probe", "fuzz": "fuzz",
}


def _os_message(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return e.strerror or str(e)


class NodeCtl(click.Group):
    """The top-level group: loads command modules lazily (as in click's
    examples/complex) and maps errors to exit codes, in this one place."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        return getattr(importlib.import_module(f"{__name__}.{module}"), cmd_name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NFactorError as e:
            message = str(e)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # click's main handles a closed stdout
            message = _os_message(e)
        click.echo(f"error: {message}", err=True)
        ctx.exit(EXIT_ERROR)


EPILOG = f"""\b
Exit codes:
  {EXIT_OK}  done
  {EXIT_ERROR}  error: the node refused or could not do it (the reason on stderr),
     `probe` found a feature missing, or `fuzz` found a problem
  {EXIT_USAGE}  usage error: unknown command, bad option or value
  {EXIT_PARTIAL}  partly done: `migrate` could not move some flows, `demo` lost traffic
"""


def package_version() -> str:
    """The installed package's version; the source tree's when it is not installed."""
    try:
        return importlib.metadata.version("nfactor-xdp")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__
        return __version__


def _show_version(ctx: click.Context, param, value) -> None:
    if not value or ctx.resilient_parsing:
        return
    from ..kern.layouts import C  # read from the shared header only when asked: every command would pay
    click.echo(f"nfactorctl {package_version()}, BPF ABI {C['NFX_ABI_VERSION']}")
    ctx.exit()


@click.group(cls=NodeCtl, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the package's version and its BPF ABI version (a node refuses pinned maps of another "
                   "ABI), and exit.")
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


if __name__ == "__main__":
    main()
