"""`python -m im_server.bench` against running servers: its own WebSocket framing
delivers, acks and counts correctly (small figures; speed is measured in
docs/benchmarks.md, not here)."""

from __future__ import annotations

import json
import subprocess
import sys

from im_server.bench import _steal_pct
from im_server.localstack import ServerProcess, Stack


def _bench(server: ServerProcess, stack: Stack, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "im_server.bench", "--url", server.url,
         "--admin-token", stack.admin_token, "--json", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_load_run_delivers_every_acked_message_once_in_order(
    stack: Stack, server: ServerProcess
) -> None:
    result = _bench(server, stack, "--users", "6", "--rate", "150", "--duration", "2",
                    "--grace", "10")  # fmt: skip
    assert result["sent"] == 300
    assert result["acked"] == result["delivered"] == 300
    assert (result["lost"], result["duplicates"], result["reordered"]) == (0, 0, 0)
    assert 0 < result["deliver_p50_ms"] <= result["deliver_p99_ms"]  # type: ignore[operator]
    assert 0 <= result["cpu_steal_pct"] < 100  # type: ignore[operator]


def test_serial_run_waits_for_each_ack(stack: Stack, server: ServerProcess) -> None:
    result = _bench(server, stack, "--serial", "200")
    assert result["acked"] == 200
    assert result["serial_total_s"] > 0  # type: ignore[operator]


def test_steal_is_the_share_of_cpu_time_taken_by_the_hypervisor() -> None:
    before = [100, 0, 50, 800, 10, 0, 5, 35]
    after = [160, 0, 70, 840, 10, 0, 10, 60]  # 150 ticks passed, 25 of them stolen
    assert _steal_pct(before, after) == 16.7
    assert _steal_pct([], after) is None  # no /proc/stat: not a Linux host
