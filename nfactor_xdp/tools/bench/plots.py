"""The paper's figures, drawn from a benchmark's JSON as PNG files:

  chains       fig6a-chains.png          zero-loss rate per service chain, 1 and 2 runtimes,
                                         with the XDP-only ceilings (paper Fig. 6a)
  migration    fig7-migration.png        batch time and per-flow latency by flow count and
                                         per-flow rate (Fig. 7)
               fig8-migration-caps.png   the same by cap on concurrent migrations (Fig. 8)
  replication  fig10-replication.png     throughput with and without snapshots every K
                                         packets, recovery time by flow count (Fig. 10)

matplotlib is an optional dependency (the `plot` extra) and runs with its
Agg backend: no display needed.  Only the JSON is read, so a result can be
drawn again later, on another machine (`nfactorctl bench plot`).
"""
from __future__ import annotations

import os

from ...errors import NFactorError

PNG_DPI = 110
FIGURES = {"chains": ("fig6a-chains",), "migration": ("fig7-migration", "fig8-migration-caps"),
           "replication": ("fig10-replication",)}


class PlotError(NFactorError):
    pass


def pyplot():
    """matplotlib.pyplot on the Agg backend; PlotError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'nfactor-xdp[plot]' (or .venv/bin/pip install "
                        "matplotlib; vm/provision.sh installs it)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, out_dir: str, prefix: str = "") -> list[str]:
    """Draw the figures of `result` (a benchmark's JSON) into `out_dir`; their paths."""
    kind = result.get("benchmark") if isinstance(result, dict) else None
    if kind not in FIGURES:
        raise PlotError(f"no figure for {'a ' + repr(kind) if kind else 'this'} benchmark result: the results of "
                        f"{', '.join(FIGURES)} have one")
    plt = pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, draw in zip(FIGURES[kind], _DRAW[kind]):
        fig, note = draw(plt, result)
        _footnote(fig, result, note)
        path = os.path.join(out_dir, f"{prefix}{name}.png")
        fig.savefig(path, dpi=PNG_DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def _footnote(fig, result: dict, note: str) -> None:
    """The machine, and what the figure leaves out, under the axes."""
    m = result.get("machine") or {}
    fig.text(0.01, 0.01, f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, kernel {m.get('kernel', '?')}",
             fontsize=7, color="grey")
    if note:
        fig.text(0.01, 0.04, note[:200], fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.07 if note else 0.03, 1, 1))


def _ticks(ax, xs) -> None:
    """The measured values as the ticks of a log axis, written out."""
    ax.set_xscale("log")
    xs = sorted(set(xs))
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()


def _label_bars(ax, bars, texts) -> None:
    """Each bar's figure inside its top: a max-forwarded mark may sit just above it."""
    for bar, text in zip(bars, texts):
        if text and bar.get_height() > 0:
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="top",
                        xytext=(0, -2), textcoords="offset points", fontsize=7, color="white", weight="bold")


def _chain_name(chain: list[str]) -> str:
    return "->\n".join(chain) if chain else "no NF"


# --- Fig. 6a ------------------------------------------------------------------------

def _fig6a(plt, r: dict):
    ms = [m for m in r.get("measurements", []) if "zero_loss_mpps" in m]
    chains = list(dict.fromkeys(_chain_name(m.get("chain") or []) for m in ms))
    # one series per runtime count and offload setting (results from before offload have none: off)
    series = sorted({(m["runtimes"], m.get("offload", "off")) for m in ms}, key=lambda s: (s[1], s[0]))
    both = len({o for _, o in series}) > 1
    fig, ax = plt.subplots(figsize=(11 if both else 9, 5.2))
    width = 0.8 / max(1, len(series))
    floor = None
    for i, (n, offload) in enumerate(series):
        row = {_chain_name(m.get("chain") or []): m for m in ms
               if m["runtimes"] == n and m.get("offload", "off") == offload}
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(chains))]
        vals = [row[c]["zero_loss_mpps"] if c in row else 0.0 for c in chains]
        bars = ax.bar(xs, [v if v > 0 else float("nan") for v in vals], width,
                      label=f"{n} runtime{'s' if n > 1 else ''}" + (f", offload {offload}" if both else "")
                      + ": zero-loss")
        for bar, c in zip(bars, chains):
            if c in row and not row[c].get("confirmed"):
                bar.set_hatch("//")  # the search's best, not confirmed by a second trial
        _label_bars(ax, bars, [f"{v:.3f}" if v > 0 else "" for v in vals])
        fwd = [row[c]["max_forwarded_mpps"] if c in row else float("nan") for c in chains]
        ax.plot(xs, fwd, "_", color="black", markersize=14, mew=2, label="max forwarded" if i == 0 else None)
        positive = [v for v in vals + fwd if v and v > 0]
        floor = min(positive + ([floor] if floor else [])) if positive else floor
    for (mode, c), style in zip(sorted((r.get("ceilings") or {}).items()), ("--", ":")):
        v = c.get("zero_loss_mpps", c.get("forwarded_mpps"))
        if v:
            ax.axhline(v, ls=style, color="grey", label=f"XDP-only ceiling, {mode}: {v:.2f} Mpps")
    ax.set_yscale("log")
    if floor:
        ax.set_ylim(bottom=floor / 2)
    ax.set_xticks(range(len(chains)), chains, fontsize=8)
    ax.set_ylabel("Mpps (log scale)")
    ax.set_title("Fig. 6a: zero-loss rate per service chain (hatched: not confirmed)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.9), ncol=3)
    unconfirmed = [m["label"] for m in ms if not m.get("confirmed")]
    return fig, ("not confirmed by a second trial: " + ", ".join(unconfirmed)) if unconfirmed else ""


# --- Fig. 7 and 8 ---------------------------------------------------------------------

def _done(ms: list[dict]) -> list[dict]:
    return [m for m in ms if not m.get("skipped") and m.get("batch_seconds") is not None]


def _left_out(ms: list[dict], drawn: list[dict]) -> str:
    left = [f"{m['label']} ({'skipped' if m.get('skipped') else 'error'})" for m in ms if m not in drawn]
    return ("not measured: " + ", ".join(left)) if left else ""


def _migration_panels(plt, title: str, series: dict, xlabel: str, paper_us: float | None):
    """Two panels: the batch's time, and one flow's migration latency (average,
    p99 dotted), each a line per entry of `series` (label -> [(x, m)])."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for label, points in series.items():
        points = sorted(points, key=lambda p: p[0])
        xs = [x for x, _ in points]
        line, = left.plot(xs, [m["batch_seconds"] * 1e3 for _, m in points], "o-", label=label)
        lat = [(x, m["flow_latency_us"]) for x, m in points if m.get("flow_latency_us")]
        right.plot([x for x, _ in lat], [v["avg"] / 1e3 for _, v in lat], "o-", color=line.get_color(),
                   label=f"{label}: average")
        right.plot([x for x, _ in lat], [v["p99"] / 1e3 for _, v in lat], "^:", color=line.get_color(),
                   label=f"{label}: p99")
    if paper_us:
        right.axhline(paper_us / 1e3, ls="--", color="grey", label=f"paper: {paper_us:.0f} us average")
    left.set_ylabel("batch time (ms)")
    right.set_ylabel("one flow's migration (ms)")
    for ax, what in ((left, "the whole batch"), (right, "per-flow latency")):
        ax.set_xlabel(xlabel)
        ax.set_title(what, fontsize=10)
        _ticks(ax, [x for points in series.values() for x, _ in points] or [1])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def _fig7(plt, r: dict):
    ms = r.get("fig7_flows_rates") or []
    series: dict[str, list] = {}
    for m in _done(ms):
        series.setdefault(f"{m['rate_per_flow_pps']:g} pps per flow", []).append((m["flows"], m))
    paper = (r.get("paper_reference") or {}).get("flow_latency_us")
    return _migration_panels(plt, "Fig. 7: migrating every flow of runtime 0 under traffic, by flow count",
                             series, "flows on the node (half of them migrate)", paper), _left_out(ms, _done(ms))


def _fig8(plt, r: dict):
    caps = r.get("fig8_caps") or {}
    ms = caps.get("measurements") or []
    series = {f"{caps.get('flows')} flows x {caps.get('rate_per_flow_pps', 0):g} pps":
              [(m["max_migrations"], m) for m in _done(ms)]}
    return _migration_panels(plt, "Fig. 8: by cap on concurrent migrations per runtime", series,
                             "max concurrent migrations", None), _left_out(ms, _done(ms))


# --- Fig. 10 ----------------------------------------------------------------------------

def _fig10(plt, r: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    rows = [m for m in r.get("throughput") or [] if m.get("zero_loss_mpps") is not None]
    counts = sorted({m["runtimes"] for m in rows})
    ks = sorted({m["snapshot_every"] for m in rows})
    width = 0.8 / max(1, len(ks))
    for i, k in enumerate(ks):
        row = {m["runtimes"]: m for m in rows if m["snapshot_every"] == k}
        xs = [x + (i - (len(ks) - 1) / 2) * width for x in range(len(counts))]
        bars = left.bar(xs, [row[n]["zero_loss_mpps"] if n in row else 0 for n in counts], width,
                        label=f"K={k}: snapshot every {k} packets" if k else "no replication")
        lost = [(row.get(n) or {}).get("zero_loss_lost_ratio") for n in counts]
        _label_bars(left, bars, [f"{b.get_height():.3f}" + (f"\n-{x:.0%}" if x is not None else "")
                                 for b, x in zip(bars, lost)])
        left.plot(xs, [row[n]["max_forwarded_mpps"] if n in row else float("nan") for n in counts], "_",
                  color="black", markersize=14, mew=2, label="max forwarded" if i == 0 else None)
    left.set_xticks(range(len(counts)), [f"{n} runtime{'s' if n > 1 else ''}" for n in counts])
    left.set_ylabel("zero-loss rate (Mpps), flow_monitor")
    left.set_title("throughput with and without replication", fontsize=10)
    left.legend(fontsize=7)
    rec = [m for m in r.get("recovery") or [] if not m.get("skipped") and not m.get("error")]
    off = [m for m in rec if m.get("takeover", "off") == "off"]
    on = [m for m in rec if m.get("takeover") == "on"]
    xs = [m["flows"] for m in off]
    for key, label, style in (("detected_s", "failure detected", "s:"),
                              ("running_again_s", "takeover off: running again, flows recovered", "o-"),
                              ("recovery_seconds", "takeover off: state fetched and replayed (its own)", "^--")):
        right.plot(xs, [m.get(key) if m.get(key) is not None else float("nan") for m in off], style, label=label)
    if on:
        right.plot([m["flows"] for m in on], [m.get("taken_s") if m.get("taken_s") is not None else float("nan")
                                              for m in on], "D-", label="takeover on: flows taken by the peer")
    xs = sorted({m["flows"] for m in rec})
    paper = (r.get("paper_reference") or {}).get("recovery_total_s")
    if paper:
        right.axhline(paper, ls="--", color="grey", label=f"paper: recovered in {paper} s")
    _ticks(right, xs or [1])
    right.set_xlabel("flows on the node (the killed runtime holds half)")
    right.set_ylabel("seconds after kill -9")
    right.set_title("a runtime killed with -9: its flows back", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle("Fig. 10: state replication")
    return fig, _left_out((r.get("throughput") or []) + (r.get("recovery") or []), rows + rec)


_DRAW = {"chains": (_fig6a,), "migration": (_fig7, _fig8), "replication": (_fig10,)}
