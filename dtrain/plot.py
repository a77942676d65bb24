"""``dtrain plot``: one figure of metrics JSONL files (README "Metrics"), several runs overlaid.

Panels: loss, tokens/s, step time, memory per kind (``state_bytes`` params/grads/optim and
``peak_rss_bytes``), comm bytes per topology level, and a table of the runs. Restarts (at the
step resumed from) and faults (after their step) are vertical lines on every panel, in the run's
colour. A ``{"event": "run", ...}`` header line starts a run and names it by its ``run_id``;
without one a file is one run named by its file name. Unknown records and keys are skipped, and
so is an unreadable line (a run killed mid-write), with a note.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["PlotError", "Run", "read_runs", "plot_files"]


class PlotError(Exception):
    """A missing tool or an unusable input file; the message says which and what to do."""


@dataclass
class Run:
    """One run's records, in file order."""

    label: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)
    """Steps resumed from."""
    faults: list[int] = field(default_factory=list)
    """Steps after which a fault was injected."""
    summary: dict[str, Any] | None = None

    def segments(self) -> list[list[dict[str, Any]]]:
        """Step records split where the step goes back (a restart), so lines never run backwards."""
        out: list[list[dict[str, Any]]] = []
        for rec in self.steps:
            if not out or rec["step"] <= out[-1][-1]["step"]:
                out.append([])
            out[-1].append(rec)
        return out


def _is_step(rec: dict[str, Any]) -> bool:
    return (isinstance(rec.get("step"), (int, float)) and "event" not in rec and not rec.get("summary")
            and isinstance(rec.get("loss"), (int, float)))


def read_runs(path: str | os.PathLike) -> list[Run]:
    """The runs in one metrics file (split at run headers); PlotError if it has no step records."""
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"metrics file {str(path)!r} does not exist")
    runs = [Run(path.name)]
    unreadable = 0
    with open(path, errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if not isinstance(rec, dict):
                continue
            event = rec.get("event")
            if event == "run":
                name = str(rec.get("run_id") or rec.get("id") or path.name)
                if runs[-1].steps or runs[-1].restarts or runs[-1].faults:
                    runs.append(Run(name))
                else:
                    runs[-1].label = name
            elif event == "restart":
                step = rec.get("resumed_from_step", rec.get("step"))
                if isinstance(step, (int, float)):
                    runs[-1].restarts.append(int(step))
            elif event == "fault":
                if isinstance(rec.get("step"), (int, float)):
                    runs[-1].faults.append(int(rec["step"]))
            elif rec.get("summary"):
                runs[-1].summary = rec
            elif _is_step(rec):
                runs[-1].steps.append(rec)
    if unreadable:
        print(f"dtrain plot: {path.name}: skipped {unreadable} unreadable line(s)", file=sys.stderr)
    runs = [r for r in runs if r.steps]
    if not runs:
        raise PlotError(f"{str(path)!r} has no step records; pass a file written by dtrain launch --metrics "
                        f"(or metrics.path)")
    return runs


def _unique_labels(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"


def _bytes_unit(values: Iterable[float]) -> tuple[float, str]:
    top = max(values, default=0.0)
    for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if top >= 2 * scale:
            return scale, unit
    return 1.0, "bytes"


_KIND_STYLES = {"params": "-", "grads": "--", "optim": "-.", "peak RSS": ":"}
_KIND_WIDTHS = {"params": 2.8, "grads": 2.1, "optim": 1.4, "peak RSS": 1.6}  # equal sizes stay visible
_LEVEL_STYLES = ("-", "--", "-.", ":")


def _series(seg: list[dict[str, Any]], key: str, sub: str | None = None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in seg:
        value = rec.get(key)
        if sub is not None:
            value = value.get(sub) if isinstance(value, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(rec["step"])
            ys.append(float(value))
    return xs, ys


def _levels(runs: list[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for rec in run.steps:
            for name in (rec.get("comm_bytes") or {}):
                if name not in names:
                    names.append(name)
    return names


def _summary_line(run: Run) -> str:
    losses = [rec["loss"] for rec in run.steps]
    rates = sorted(rec["tokens_per_s"] for rec in run.steps if isinstance(rec.get("tokens_per_s"), (int, float)))
    steps = (run.summary or {}).get("steps", run.steps[-1]["step"])
    parts = [f"{run.label}: {steps} steps", f"final loss {losses[-1]:.4f}"]
    if rates:
        parts.append(f"median {rates[len(rates) // 2]:,.0f} tok/s")
    if run.restarts or run.faults:
        parts.append(f"{len(run.restarts)} restart(s), {len(run.faults)} fault(s)")
    sha = (run.summary or {}).get("param_sha256")
    if isinstance(sha, str):
        parts.append(f"sha {sha[:12]}")
    return ", ".join(parts)


def _draw(runs: list[Run], output: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("dtrain plot needs matplotlib: pip install 'dtrain[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax_loss, ax_tok, ax_time, ax_mem, ax_comm, ax_text = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mem_scale, mem_unit = _bytes_unit(
        max([r.get("peak_rss_bytes") or 0, *((r.get("state_bytes") or {}).values() or [0])])
        for run in runs for r in run.steps if isinstance(r.get("state_bytes") or {}, dict))
    levels = _levels(runs)
    comm_scale, comm_unit = _bytes_unit(
        v for run in runs for r in run.steps for v in (r.get("comm_bytes") or {}).values()
        if isinstance(v, (int, float)))

    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for n, seg in enumerate(run.segments()):
            label = run.label if n == 0 else None
            ax_loss.plot(*_series(seg, "loss"), color=color, label=label)
            ax_tok.plot(*_series(seg, "tokens_per_s"), color=color)
            ax_time.plot(*_series(seg, "step_time_s"), color=color)
            for kind, style in _KIND_STYLES.items():
                xs, ys = (_series(seg, "peak_rss_bytes") if kind == "peak RSS"
                          else _series(seg, "state_bytes", kind))
                ax_mem.plot(xs, [y / mem_scale for y in ys], color=color, linestyle=style,
                            linewidth=_KIND_WIDTHS[kind])
            for level, style in zip(levels, _LEVEL_STYLES * (len(levels) // 4 + 1)):
                xs, ys = _series(seg, "comm_bytes", level)
                ax_comm.plot(xs, [y / comm_scale for y in ys], color=color, linestyle=style)
        for ax in (ax_loss, ax_tok, ax_time, ax_mem, ax_comm):
            for step in run.restarts:
                ax.axvline(step, color=color, linestyle="--", linewidth=1.2, alpha=0.8)
            for step in run.faults:
                ax.axvline(step, color=color, linestyle=":", linewidth=1.6, alpha=0.9)

    for ax, title, ylabel in ((ax_loss, "loss", "loss"), (ax_tok, "throughput", "tokens/s"),
                              (ax_time, "step time", "s"), (ax_mem, "memory (max over ranks, log scale)", mem_unit),
                              (ax_comm, "comm bytes sent per step (busiest rank)", comm_unit)):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_tok.set_ylim(bottom=0)
    ax_time.set_ylim(bottom=0)
    if ax_mem.lines:
        ax_mem.set_yscale("log")  # peak RSS is often 100x the training state of a small model
    ax_comm.set_ylim(bottom=0)
    gray = "0.35"
    ax_mem.legend(handles=[Line2D([], [], color=gray, linestyle=s, linewidth=_KIND_WIDTHS[k], label=k)
                           for k, s in _KIND_STYLES.items()],
                  fontsize=8, loc="best")
    if levels:
        ax_comm.legend(handles=[Line2D([], [], color=gray, linestyle=s, label=lvl)
                                for lvl, s in zip(levels, _LEVEL_STYLES * (len(levels) // 4 + 1))],
                       fontsize=8, loc="best", title="level", title_fontsize=8)
    else:
        ax_comm.text(0.5, 0.5, "no comm_bytes in these records", ha="center", va="center",
                     transform=ax_comm.transAxes, color=gray)
    markers = [Line2D([], [], color=gray, linestyle="--", label="restart (step resumed from)"),
               Line2D([], [], color=gray, linestyle=":", linewidth=1.6, label="fault (after step)")]
    run_handles = [Line2D([], [], color=colors[i % len(colors)], label=run.label) for i, run in enumerate(runs)]
    ax_loss.legend(handles=run_handles + (markers if any(r.restarts or r.faults for r in runs) else []),
                   fontsize=8, loc="best")
    ax_text.axis("off")
    ax_text.set_title("runs")
    lines = [_summary_line(run) for run in runs]
    ax_text.text(0.0, 1.0, "\n".join(_wrap(line) for line in lines), va="top", ha="left", fontsize=8.5,
                 family="monospace", transform=ax_text.transAxes)
    fig.suptitle("dtrain metrics: " + ", ".join(run.label for run in runs)[:150], fontsize=12)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _wrap(line: str, width: int = 52) -> str:
    words, rows, row = line.split(", "), [], ""
    for word in words:
        if row and len(row) + len(word) + 2 > width:
            rows.append(row + ",")
            row = "  " + word
        else:
            row = f"{row}, {word}" if row else word
    rows.append(row)
    return "\n".join(rows)


def plot_files(paths: list[str], output: str | None = None) -> Path:
    """Draw the runs of ``paths`` into one PNG (default: the first path with .png); returns its path."""
    runs = [run for path in paths for run in read_runs(path)]
    _unique_labels(runs)
    out = Path(output) if output else Path(paths[0]).with_suffix(".png")
    try:
        _draw(runs, out)
    except OSError as exc:
        raise PlotError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    steps = sum(len(run.steps) for run in runs)
    print(f"dtrain plot: wrote {out} ({len(runs)} run(s), {steps} steps)", file=sys.stderr)
    return out
