"""nfactorctl fuzz: feed random and mutated input to the node's decoders and
report anything but a clean refusal.  One subcommand per decoder, each in its
own module of tools/ (messages: tools/fuzz_messages.py; parsers:
tools/fuzz_parsers.py)."""
from __future__ import annotations

import sys

import click

from . import EXIT_ERROR, EXIT_OK
from .common import emit_json


@click.group()
def fuzz():
    """Fuzz a decoder; JSON report, exit 1 on any finding."""


@fuzz.command("messages")
@click.option("--count", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Frames to feed the decoder (the suite runs a sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (a run is reproducible).")
@click.option("--slow-ms", type=float, default=50.0, show_default=True,
              help="A decode taking longer than this is a finding.")
def messages(count, seed, slow_ms):
    """Control-message frames (noise, bit flips, truncations, wrong lengths,
    and MAC-valid msgpack edge cases: huge maps, deep nesting, ...) through
    the decoder: it must only ever return a message or raise MessageError."""
    from ..tools.fuzz_messages import run
    report = run(count, seed=seed, slow_ms=slow_ms)
    emit_json(report)
    sys.exit(EXIT_OK if report["ok"] else EXIT_ERROR)


@fuzz.command("parsers")
@click.option("--count", "--frames", "count", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Frames through both parsers (the suite runs a sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (a run is reproducible).")
def parsers(count, seed):
    """Random and mutated frames (truncations, bit flips, length fields,
    IPv6 extension chains, VLAN tags, fragments, protocols) through the
    switch's XDP parser (BPF_PROG_TEST_RUN, in a scratch namespace; root) and
    the runtime's Python parser: both must give every frame the same class,
    key and direction, and neither may fail."""
    from ..tools.fuzz_parsers import run

    def progress(done, seconds, found):
        click.echo(f"{done} frames, {seconds:.0f} s, {found} findings", err=True)
    report = run(count, seed=seed, progress=progress)
    emit_json(report)
    sys.exit(EXIT_OK if report["ok"] else EXIT_ERROR)
