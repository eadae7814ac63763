"""`imcloud drill report`: the recorded drills as a table, and one PNG plot per drill.

Each drill writes ``<cloud>/drills/<id>.json`` (``{"result": figures, "timeline":
time series}``) and appends its figures as one line to ``<cloud>/drills/history.jsonl``.
The plot (``<id>.png`` beside it) shows the send latency of every message and the
failed attempts per second around the fault, with the fault, detection, restore
and rejoin marked, for an operator to show an auditor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from installer.core.cloud import Cloud
from installer.core.drill_load import Timeline
from installer.errors import ImcloudError

__all__ = [
    "HISTORY_NAME",
    "DrillReport",
    "drill_report",
    "drills_dir",
    "fmt",
    "plot",
    "write_record",
]

HISTORY_NAME = "history.jsonl"
_MARKS = (  # timeline mark, label, colour
    ("fault", "fault", "#d62728"),
    ("detected", "detected", "#ff7f0e"),
    ("restore", "restore", "#2ca02c"),
    ("rejoined", "rejoined", "#1f77b4"),
)


def drills_dir(cloud: Cloud) -> Path:
    return cloud.dir / "drills"


def write_record(cloud: Cloud, summary: dict[str, Any], timeline: Timeline) -> Path:
    """Store one drill: its JSON file and a line in the history."""
    directory = drills_dir(cloud)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{summary['id']}.json"
    path.write_text(json.dumps({"result": summary, "timeline": timeline.to_dict()}) + "\n")
    with open(directory / HISTORY_NAME, "a") as history:
        history.write(json.dumps(summary, sort_keys=True) + "\n")
    return path


@dataclass
class DrillReport:
    drills: list[dict[str, Any]]  # figures of each drill, oldest first
    plots: dict[str, Path]  # drill id -> PNG

    def to_dict(self) -> dict[str, Any]:
        return {"drills": self.drills, "plots": {k: str(v) for k, v in self.plots.items()}}


def drill_report(cloud: Cloud) -> DrillReport:
    """Read the history; (re)write the PNG of every drill whose plot is missing or older."""
    directory = drills_dir(cloud)
    history = directory / HISTORY_NAME
    if not history.is_file():
        raise ImcloudError(f"no drill recorded in {directory}: run `imcloud drill failover` first")
    drills = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    plots: dict[str, Path] = {}
    for summary in drills:
        source = directory / f"{summary['id']}.json"
        if not source.is_file():
            continue
        png = source.with_suffix(".png")
        if not png.is_file() or png.stat().st_mtime < source.stat().st_mtime:
            data = json.loads(source.read_text())
            plot(data["result"], Timeline.from_dict(data["timeline"]), png)
        plots[summary["id"]] = png
    return DrillReport(drills=drills, plots=plots)


def fmt(value: float | None, unit: str, digits: int = 1) -> str:
    """A figure for people; n/a for a missing one."""
    if value is None or math.isinf(value):
        return "n/a"
    return f"{value:.{digits}f} {unit}"


def plot(summary: dict[str, Any], timeline: Timeline, path: Path) -> None:
    """Latency of each message (by first send) and failed attempts per second."""
    import matplotlib  # noqa: PLC0415 (slow import; only the report plots)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    acked = sorted(timeline.acked_at)
    xs = [timeline.first_sent[n] for n in acked if n in timeline.first_sent]
    ys = [(timeline.acked_at[n] - timeline.first_sent[n]) * 1000 for n in acked
          if n in timeline.first_sent]
    top.scatter(xs, ys, s=6, color="#1f77b4", label="acked message: first send -> ack")
    never = [timeline.first_sent[n] for n in timeline.first_sent if n not in timeline.acked_at]
    if never:
        ceiling = max(ys, default=1000.0)
        top.scatter(never, [ceiling] * len(never), marker="x", color="#d62728",
                    label="never acked")
    top.set_yscale("log")
    top.yaxis.set_major_formatter(ScalarFormatter())
    top.set_ylabel("send latency (ms, log scale)")
    top.grid(True, which="both", alpha=0.3)

    end = max([a.done for a in timeline.attempts] + [summary.get("duration_s") or 0.0, 1.0])
    seconds = range(math.ceil(end) + 1)
    failed = [0] * len(seconds)
    sent = [0] * len(seconds)
    for attempt in timeline.attempts:
        slot = min(int(attempt.sent), len(seconds) - 1)
        sent[slot] += 1
        if not attempt.ok:
            failed[slot] += 1
    bottom.bar(seconds, sent, width=1.0, align="edge", color="#c7c7c7",
               label="attempts (with retries)")
    bottom.bar(seconds, failed, width=1.0, align="edge", color="#d62728", label="failed attempts")
    bottom.set_ylabel("per second")
    bottom.set_xlabel("seconds since the load started")
    bottom.grid(True, alpha=0.3)

    marks = timeline.marks
    if "fault" in marks and "restore" in marks:
        for axis in (top, bottom):
            axis.axvspan(marks["fault"], marks["restore"], color="#d62728", alpha=0.07)
    for row, (key, label, colour) in enumerate(_MARKS):
        if key in marks:
            for axis in (top, bottom):
                axis.axvline(marks[key], color=colour, linestyle="--", linewidth=1.2)
            top.annotate(f"{label} {marks[key]:.1f} s", (marks[key], 1.0),
                         xycoords=("data", "axes fraction"), xytext=(3, -12 - 12 * row),
                         textcoords="offset points", color=colour, fontsize=9)
    top.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    verdict = "PASSED" if summary.get("ok") else "FAILED"
    rto = fmt(summary.get("rto_s"), "s", 2)
    lost = summary["acked_lost"]
    if summary.get("failed_attempts") == 0:
        rto += " (no send failed)"
    fig.suptitle(
        f"imcloud drill {summary['id']}: {summary['target']} ({summary['mode']}) on "
        f"{summary['host']}, {summary['domain']} - {verdict}\n"
        f"detection {fmt(summary.get('detection_s'), 's', 2)}, RTO {rto}, "
        f"sent {summary['sent']}, acked {summary['acked']}, delivered {summary['delivered']}, "
        f"acked-but-lost {'unknown' if lost is None else lost}, "
        f"duplicates {summary['duplicates']}, "
        f"reordered {summary['reordered']}, p99 around the fault "
        f"{fmt(summary.get('p99_fault_ms'), 'ms', 0)}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
