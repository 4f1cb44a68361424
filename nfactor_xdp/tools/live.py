"""A node's live table (the switch's totals, then a row per runtime: state,
CPU, flows, frames and their rate), redrawn in place on a terminal: what
`nfactorctl status --watch` and the demo show."""
from __future__ import annotations

import sys


def table(st: dict, prev: dict, dt: float, title: str) -> str:
    """The table of `st` (node_client.status).  prev: runtime id -> frames at
    the last table, `dt` seconds ago (updated here); a runtime's rate shows
    from its second table on."""
    sw = st["switch"]
    rows = [f"{title}  switch: {st['switch_flows']} flows, {sw.get('to_runtime', 0)} frames to runtimes, "
            f"{sw.get('off_forward', 0)} forwarded for offloaded flows, {sw.get('other_forward', 0)} other "
            f"forwarded, {sum(v for k, v in sw.items() if k.startswith('drop_'))} dropped "
            f"(+{sw.get('off_drop', 0) + sw.get('off_bucket_drop', 0)} by offloaded flows' NFs)",
            f"  {'runtime':<8}{'state':<10}{'core':>5}{'pid':>8}{'cpu':>6}{'flows':>8}{'frames':>11}{'frames/s':>10}"
            f"{'placed':>8}{'restarts':>9}"]
    for r in st["runtimes"]:
        frames = r.get("frames") or 0
        rate = f"{(frames - prev[r['id']]) / dt:.0f}" if dt > 0 and r["id"] in prev else "-"
        prev[r["id"]] = frames
        cpu = (r.get("load") or {}).get("cpu")
        rows.append(f"  rt{r['id']:<6}{r.get('state', '?'):<10}{r['core']:>5}{r.get('pid') or '-':>8}"
                    f"{'-' if cpu is None else f'{cpu:.0%}':>6}{r.get('flows') or 0:>8}{frames:>11}{rate:>10}"
                    f"{(r.get('switch') or {}).get('flows_placed', 0):>8}{r.get('restarts') or 0:>9}")
    return "\n".join(rows)


class Screen:
    """Shows a block of text: on a terminal over the previous block (cursor up
    its height, clear below), elsewhere after it."""

    def __init__(self, out=print, stream=None):
        self.out, self.stream = out, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.height = 0

    def show(self, text: str) -> None:
        if self.tty and self.height:
            self.stream.write(f"\x1b[{self.height}F\x1b[J")
        elif self.height:
            self.out("")  # a blank line between two tables in a file or a pipe
        self.out(text)
        self.height = text.count("\n") + 1
