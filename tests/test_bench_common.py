"""Helpers the benchmarks report with."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.common import (
    FsyncProbe,
    JvmBursts,
    MachineLoad,
    cpu_ticks,
    jit_cpu_seconds,
    jvm_thread_kind,
    pct,
    window_p99,
)
from bench.pulsar_bench import _cpu_per_txn, _describe_cost, _due_times


def test_window_p99_splits_by_scheduled_second_across_clients() -> None:
    # Two clients: second 0 is fast for both, second 1 has one slow transaction.
    a = {"scheduled_at": [0.1, 0.5, 1.2, 1.9], "latencies": [0.010, 0.012, 0.011, 0.200]}
    b = {"scheduled_at": [0.3, 1.4], "latencies": [0.009, 0.013]}
    windows = window_p99([a, b])
    assert len(windows) == 2
    assert math.isclose(windows[0], 12.0)
    assert math.isclose(windows[1], 200.0)
    # Half-second windows: four of them, the slow one last.
    halves = window_p99([a, b], width=0.5)
    assert len(halves) == 4 and math.isclose(halves[-1], 200.0)


def test_fsync_probe_times_synced_writes_in_its_directory(tmp_path: Path) -> None:
    probe = FsyncProbe(tmp_path, interval=0.005)
    probe.start()
    time.sleep(0.3)
    assert probe.path.parent == tmp_path and probe.path.stat().st_size > 0
    probe.stop()
    assert not probe.path.exists(), "the probe's file is removed when it stops"
    assert len(probe.samples) >= 5
    starts = [at for at, _took in probe.samples]
    assert starts == sorted(starts) and starts[-1] < 1.0
    assert all(0.0 < took < 1.0 for _at, took in probe.samples)
    # Restartable: a second run starts a fresh record.
    probe.start()
    time.sleep(0.05)
    probe.stop()
    assert 0 < len(probe.samples) < 30


def test_fsync_probe_reports_the_slowest_sync_of_each_window() -> None:
    probe = FsyncProbe(".")
    probe.samples = [(0.2, 0.001), (1.1, 0.002), (1.7, 0.030), (3.5, 0.004)]
    worst = probe.window_max(range(1, 4))
    assert worst[0] == pytest.approx(30.0) and worst[2] == pytest.approx(4.0)
    assert math.isnan(worst[1]), "a second without a sample says so"
    assert probe.window_max([0]) == [pytest.approx(1.0)]


def test_jvm_thread_kinds() -> None:
    assert jvm_thread_kind("C2 CompilerThre") == "jit"
    assert jvm_thread_kind("C1 CompilerThre") == "jit"
    assert jvm_thread_kind("ZWorkerOld#0") == "gc"
    assert jvm_thread_kind("GC Thread#1") == "gc"
    assert jvm_thread_kind("G1 Conc#0") == "gc"
    assert jvm_thread_kind("pulsar-io-4-1") == "other"


def test_jvm_bursts_counts_a_busy_thread_named_like_a_compiler() -> None:
    """A thread of this process renamed (its /proc comm) as HotSpot names a compiler
    thread, spinning for about half a second: the sampler sees most of a core of "jit"
    in the windows it spun in, and no "gc"."""
    stop = threading.Event()
    named = threading.Event()

    def spin() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write("C2 CompilerThre")
        named.set()
        while not stop.is_set():
            sum(range(1000))

    jit_before = jit_cpu_seconds(os.getpid())
    bursts = JvmBursts(os.getpid(), interval=0.25)
    bursts.start()
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    assert named.wait(5)
    time.sleep(1.1)
    jit_after = jit_cpu_seconds(os.getpid())  # while the thread still exists
    stop.set()
    spinner.join(5)
    bursts.stop()
    jit = bursts.window("jit", range(8), width=0.25)
    gc = bursts.window("gc", range(8), width=0.25)
    assert max(w for w in jit if not math.isnan(w)) > 0.3
    assert all(w == 0 for w in gc if not math.isnan(w))
    assert jit_before is not None and jit_after is not None
    assert jit_after - jit_before > 0.3


def test_pct_of_nothing_is_nan() -> None:
    assert math.isnan(pct([], 0.99))
    assert pct([1.0, 2.0, 3.0], 0.5) == 2.0


def test_cpu_ticks_count_everything_but_idle_and_iowait_as_busy() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 7 0\nintr 1\n"
    busy, total = cpu_ticks(stat)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2 + 10  # guest is inside user already
    assert busy == total - 800 - 20


def test_machine_load_measures_this_process_and_the_machine() -> None:
    load = MachineLoad([os.getpid()])
    load.start()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of this process's CPU
        pass
    load.stop()
    assert 0.25 <= load.cpu_seconds < 1.0
    # At least this process's share of the machine was busy meanwhile.
    assert 0.0 < load.busy <= 1.0


def test_machine_load_reports_named_parts_apart_from_the_rest() -> None:
    # A child that burns 0.4 s of CPU, then waits to be killed (alive when measured).
    burn = "import time\nt = time.process_time() + 0.4\nwhile time.process_time() < t: pass\n"
    child = subprocess.Popen(
        [sys.executable, "-c", burn + "print('done', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        load = MachineLoad([os.getpid()], {"child": [child.pid]})
        load.start()
        assert child.stdout is not None and child.stdout.readline().strip() == b"done"
        load.stop()
    finally:
        child.kill()
        child.wait()
    assert 0.3 <= load.part_seconds["child"] < 1.5
    # This process mostly waited: the rest is far below the child's share.
    assert -1e-9 <= load.rest_seconds < load.part_seconds["child"] / 2
    assert math.isclose(load.cpu_seconds, load.part_seconds["child"] + load.rest_seconds)


def test_cpu_per_txn_splits_the_parts_and_the_clients() -> None:
    load = MachineLoad([])
    load.cpu_seconds = 1.5
    load.part_seconds = {"broker": 0.5, "writer": 0.25}
    cost = _cpu_per_txn(load, 10_000)
    assert cost == {"broker": 50.0, "writer": 25.0, "clients": 75.0, "total": 150.0}
    assert _describe_cost(cost) == "150 us (broker 50, writer 25, clients 75)"


def test_paced_transactions_are_stamped_when_they_fall_due() -> None:
    # 25 txn/s from t0 = 100: the first falls due at 100.04, not at 100 (stamping it
    # earlier added 40 ms to every latency measured at that rate).
    assert _due_times(100.0, 25.0, 0, 100.039) == []
    first = _due_times(100.0, 25.0, 0, 100.05)
    assert len(first) == 1 and math.isclose(first[0], 100.04)
    # After two submitted, by 100.2 the 3rd..5th are due, each one interval apart.
    later = _due_times(100.0, 25.0, 2, 100.2)
    assert [round(x, 6) for x in later] == [100.12, 100.16, 100.2]
    assert _due_times(100.0, 25.0, 5, 100.2) == []


@pytest.mark.parametrize(
    "module",
    [
        "bench.pulsar_bench",
        "bench.embedded_bench",
        "bench.validator_bench",
        "bench.bookkeeper_bench",
    ],
)
def test_each_benchmark_module_answers_help_without_running(module: str) -> None:
    # `--help` once started the whole benchmark (minutes, a broker) in three of them.
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert f"usage: python -m {module}" in out.stdout
    assert "--" in out.stdout.split("usage:", 1)[1]
