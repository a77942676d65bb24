"""Shared helpers for the dtrain benchmarks (generic; no benchmark-specific logic here).

Owns: reading process memory high-water marks from ``/proc``, finding a free TCP port,
robust statistics (median/min/max) and interleaved run schedules for noisy machines,
launching a group of ranked worker processes with a timeout (so one hung run cannot stall
a benchmark), counting the bytes a set of tensors really holds (deduplicated by storage),
machine/environment description, and writing results as JSON (atomically) and as
grouped-bar PNG charts (matplotlib, Agg backend).
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# --------------------------------------------------------------------------- /proc memory


def read_proc_status_kib(field_name: str, pid: int | str = "self") -> int | None:
    """Return a ``kB`` field of ``/proc/<pid>/status`` (e.g. ``VmHWM``) in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size (VmHWM) of this process in bytes; None where /proc is absent."""
    kib = read_proc_status_kib("VmHWM")
    return None if kib is None else kib * 1024


def current_rss_bytes() -> int | None:
    """Current resident set size (VmRSS) of this process in bytes; None where /proc is absent."""
    kib = read_proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


# --------------------------------------------------------------------------- networking


def find_free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a currently free TCP port on ``host`` (small race window, as usual)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and count of ``values`` (None entries for an empty sequence)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the non-None values, or None if there are none."""
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def rotated_schedule(items: Sequence[Any], repeats: int) -> list[tuple[int, Any]]:
    """Interleave ``repeats`` passes over ``items``, rotating the start each pass.

    Returns ``(pass_index, item)`` pairs. Rotation spreads slow drifts of a noisy machine
    (thermal, neighbours) evenly over the items instead of penalising whichever runs last.
    """
    out: list[tuple[int, Any]] = []
    n = len(items)
    for r in range(repeats):
        shift = (r * n // repeats) % n if n else 0
        order = list(items[shift:]) + list(items[:shift])
        out.extend((r, it) for it in order)
    return out


def safe_ratio(num: float | None, den: float | None) -> float | None:
    """``num / den`` or None when either is missing or the denominator is zero."""
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


# --------------------------------------------------------------------------- tensors


def tensor_storage_bytes(tensors: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes held by ``tensors``, each storage counted once: :func:`dtrain.metrics.storage_bytes`,
    the one measurement used for every framework (dtrain's own state included) and by the test
    that dtrain's formula agrees with it (tests/dist/test_state_bytes.py)."""
    from dtrain.metrics import storage_bytes

    return storage_bytes(tensors, seen)


def iter_tensors(obj: Any) -> Iterable[Any]:
    """Every tensor in nested dicts, lists, tuples and sets: :func:`dtrain.metrics.iter_tensors`."""
    from dtrain.metrics import iter_tensors as iter_nested

    return iter_nested(obj)


# --------------------------------------------------------------------------- processes


@dataclass
class RankOutcome:
    rank: int
    returncode: int | None
    stdout_tail: str
    stderr_tail: str


@dataclass
class GroupOutcome:
    """Result of one launch of a group of ranked worker processes."""

    ok: bool
    timed_out: bool
    wall_s: float
    ranks: list[RankOutcome] = field(default_factory=list)
    error: str | None = None


def _tail(path: Path, max_chars: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-max_chars:].decode("utf-8", errors="replace")


def _first_error(ranks: list[RankOutcome], max_chars: int = 2000) -> str:
    """The most informative error text from the failing ranks (a traceback if any)."""
    failing = [r for r in ranks if r.returncode not in (0, None)] or ranks
    for r in failing:
        txt = r.stderr_tail
        idx = txt.rfind("Traceback (most recent call last)")
        if idx >= 0:
            return f"rank {r.rank} (rc={r.returncode}): " + txt[idx:][-max_chars:]
    r = failing[0]
    return f"rank {r.rank} (rc={r.returncode}): " + (r.stderr_tail or r.stdout_tail)[-max_chars:]


def _kill_groups(procs: list[subprocess.Popen], wait: bool) -> None:
    """SIGKILL the process group of every still-running rank (each was started in its own session)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if wait:
                p.wait()


def run_rank_group(
    argv: Sequence[str],
    world: int,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    master_addr: str = "127.0.0.1",
    grace_s: float = 20.0,
    tail_chars: int = 6000,
) -> GroupOutcome:
    """Launch ``world`` copies of ``argv`` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* set.

    Each rank runs in its own session so that a timeout (or a sibling's crash followed by
    ``grace_s`` seconds) kills exactly the process groups started here. stdout/stderr go to
    temporary files (no pipe deadlocks); their tails are returned.
    """
    port = find_free_port(master_addr)
    logdir = Path(tempfile.mkdtemp(prefix="bench_ranks_"))
    procs: list[subprocess.Popen[bytes]] = []
    files: list[tuple[Path, Path]] = []
    t0 = time.monotonic()
    base_env = dict(os.environ if env is None else env)
    try:
        for rank in range(world):
            renv = dict(base_env)
            renv.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR=master_addr,
                MASTER_PORT=str(port),
            )
            out_p, err_p = logdir / f"rank{rank}.out", logdir / f"rank{rank}.err"
            files.append((out_p, err_p))
            with open(out_p, "wb") as fo, open(err_p, "wb") as fe:
                procs.append(
                    subprocess.Popen(
                        list(argv), env=renv, stdout=fo, stderr=fe, start_new_session=True
                    )
                )
        timed_out = False
        first_fail_at: float | None = None
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes) and first_fail_at is None:
                first_fail_at = now
            if now - t0 > timeout_s:
                timed_out = True
                break
            if first_fail_at is not None and now - first_fail_at > grace_s:
                break
            time.sleep(0.2)
        _kill_groups(procs, wait=True)
        wall = time.monotonic() - t0
        ranks = [
            RankOutcome(
                rank=i,
                returncode=p.returncode,
                stdout_tail=_tail(files[i][0], tail_chars),
                stderr_tail=_tail(files[i][1], tail_chars),
            )
            for i, p in enumerate(procs)
        ]
        ok = not timed_out and all(r.returncode == 0 for r in ranks)
        error = None
        if timed_out:
            error = f"timed out after {timeout_s:.0f}s; " + _first_error(ranks, 800)
        elif not ok:
            error = _first_error(ranks)
        return GroupOutcome(ok=ok, timed_out=timed_out, wall_s=wall, ranks=ranks, error=error)
    finally:
        _kill_groups(procs, wait=False)
        for out_p, err_p in files:
            for f in (out_p, err_p):
                try:
                    f.unlink()
                except OSError:
                    pass
        try:
            logdir.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- environment


def machine_info(extra_modules: Sequence[str] = ()) -> dict[str, Any]:
    """A short description of the host and the versions of the relevant packages."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import psutil

        info["mem_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib import metadata

    for mod in ("torch", *extra_modules):
        try:
            info[f"{mod}_version"] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            info[f"{mod}_version"] = None
    return info


# --------------------------------------------------------------------------- output


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (``<path>.tmp`` then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class BarPanel:
    """One subplot of grouped bars: ``values[series][category]`` (None = missing bar)."""

    title: str
    ylabel: str
    categories: list[str]
    values: dict[str, list[float | None]]
    errors: dict[str, list[tuple[float, float] | None]] | None = None  # (low, high) abs


def write_bar_png(path: str | Path, panels: Sequence[BarPanel], suptitle: str = "") -> Path:
    """Draw ``panels`` as stacked grouped-bar charts to a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.1 * max(
        len(p.categories) for p in panels) + 3), 4.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        n_series = max(1, len(panel.values))
        width = 0.8 / n_series
        xs = list(range(len(panel.categories)))
        for s_idx, (series, vals) in enumerate(panel.values.items()):
            offs = [x - 0.4 + width * (s_idx + 0.5) for x in xs]
            heights = [v if v is not None else 0.0 for v in vals]
            yerr = None
            if panel.errors and series in panel.errors:
                lo = [
                    (h - e[0]) if e is not None and v is not None else 0.0
                    for h, v, e in zip(heights, vals, panel.errors[series])
                ]
                hi = [
                    (e[1] - h) if e is not None and v is not None else 0.0
                    for h, v, e in zip(heights, vals, panel.errors[series])
                ]
                yerr = [[max(0.0, x) for x in lo], [max(0.0, x) for x in hi]]
            bars = ax.bar(offs, heights, width, label=series, yerr=yerr, capsize=2)
            for b, v in zip(bars, vals):
                label = "failed" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}")
                ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7, rotation=90,
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(xs)
        ax.set_xticklabels(panel.categories, rotation=20, ha="right", fontsize=8)
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        ax.margins(y=0.18)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
