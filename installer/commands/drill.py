"""imcloud drill: failover drills on a live cloud (`failover`) and their record (`report`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from installer.commands.options import CloudDir, JsonOutput
from installer.console import console, err_console, operator_errors, print_json
from installer.core import drill as core
from installer.core.cloud import DEFAULT_CLOUD_DIR, Cloud
from installer.core.drill_report import drill_report, fmt

app = typer.Typer(
    help="Failover drills: break one part of the cloud under IM load, measure, restore.",
    no_args_is_help=True,
)


@app.command("failover")
@operator_errors
def failover(
    target: Annotated[
        str, typer.Option("--target", help=f"What to break: {', '.join(core.TARGET_UNITS)}.")
    ],
    mode: Annotated[str, typer.Option("--mode", help=f"How: {', '.join(core.MODES)}.")] = "kill",
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            help="Host to break (default: app: any app host; db: the "
            "Patroni leader; cache: the Redis master; lb: the floating address's holder).",
        ),
    ] = None,
    rate: Annotated[
        float, typer.Option("--rate", help="Messages per second (1-200).")
    ] = core.DEFAULT_RATE,
    duration: Annotated[
        float, typer.Option("--duration", help="Seconds of load (15-600).")
    ] = core.DEFAULT_DURATION,
    cloud: CloudDir = DEFAULT_CLOUD_DIR,
    json_output: JsonOutput = False,
) -> None:
    """Run IM load through the public address, break the target, restore it, and report
    detection time, RTO, acked-but-lost messages, duplicates, reordering and latency.

    Refuses (breaking nothing) a cloud that is not healthy or whose layout cannot survive
    the fault. Exits 1 if the drill found a problem.
    """
    loaded = Cloud.load(cloud)
    with err_console.status("drill") as status:

        def progress(line: str) -> None:
            err_console.print(f"drill: {line}", highlight=False, markup=False)
            status.update(f"drill: {line}")

        result = core.run_drill(
            loaded, target=target, mode=mode, rate=rate, duration=duration, host=host,
            progress=progress,
        )  # fmt: skip
    summary = result.to_dict()
    if json_output:
        print_json(summary)
    else:
        console.print(_figures(summary))
    if not result.ok:
        err_console.print("[bold red]drill found problems:[/]")
        for line in result.problems:
            err_console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1)
    if not json_output:
        console.print(f"[bold green]drill passed[/]; `imcloud drill report` plots it ({result.id})")


def _figures(s: dict[str, Any]) -> Table:
    table = Table(title=f"imcloud drill {s['id']}", show_header=False)
    table.add_column("figure")
    table.add_column("value")
    rows = [
        ("broken", f"{s['target']} ({s['mode']}) on {s['host']}"),
        ("detection", f"{fmt(s['detection_s'], 's', 2)} ({s['detection']})"),
        ("RTO", f"{fmt(s['rto_s'], 's', 2)} (first failed send to the first acked send after it)"),
        ("messages", f"sent {s['sent']}, acked {s['acked']}, delivered {s['delivered']}"),
        ("acked but lost", "unknown" if s["acked_lost"] is None else str(s["acked_lost"])),
        ("duplicates / reordered", f"{s['duplicates']} / {s['reordered']}"),
        ("failed attempts", str(s["failed_attempts"])),
        (
            "p99 send latency",
            f"before {fmt(s['p99_before_ms'], 'ms', 0)}, "
            f"around the fault {fmt(s['p99_fault_ms'], 'ms', 0)}",
        ),
        ("rejoined", "yes" if s["rejoined_at_s"] is not None else "NO"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command("report")
@operator_errors
def report(cloud: CloudDir = DEFAULT_CLOUD_DIR, json_output: JsonOutput = False) -> None:
    """Every recorded drill as a table; writes a PNG plot per drill (latency and errors
    around the fault, fault and restore marked) next to its record in <cloud>/drills/."""
    with err_console.status("plotting drills"):
        result = drill_report(Cloud.load(cloud))
    if json_output:
        print_json(result.to_dict())
        return
    table = Table(title=f"{len(result.drills)} drill(s)")
    for column in (
        "drill",
        "host",
        "detection",
        "RTO",
        "sent/acked",
        "lost",
        "dup/reord",
        "p99 fault",
        "result",
    ):
        table.add_column(column)
    for d in result.drills:
        table.add_row(
            d["id"], d["host"], fmt(d["detection_s"], "s", 2), fmt(d["rto_s"], "s", 2),
            f"{d['sent']}/{d['acked']}", "?" if d["acked_lost"] is None else str(d["acked_lost"]),
            f"{d['duplicates']}/{d['reordered']}", fmt(d["p99_fault_ms"], "ms", 0),
            "[green]passed[/]" if d["ok"] else "[bold red]FAILED[/]",
        )  # fmt: skip
    console.print(table)
    for drill_id, path in result.plots.items():
        console.print(f"{drill_id}: {path}", highlight=False)
