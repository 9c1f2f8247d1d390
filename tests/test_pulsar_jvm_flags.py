"""The local broker's JVM command line: the collector (see ``default_gc_flags``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerlog.devservers import pulsar as dev
from ledgerlog.devservers.pulsar import LocalPulsar, default_gc_flags


@pytest.mark.parametrize(
    ("version", "generational"), [(17, False), (21, True), (22, True), (25, False)]
)
def test_default_collector_is_upstreams_zgc(version: int, generational: bool) -> None:
    flags = default_gc_flags(version)
    assert flags[0] == "-XX:+UseZGC"
    # Java 21 and 22 run ZGC single-generation unless asked; from 24 on only the
    # generational one exists (the flag is obsolete there), and 17 has no generations.
    assert ("-XX:+ZGenerational" in flags) is generational
    assert "-XX:+PerfDisableSharedMem" in flags


def _command(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> list[str]:
    monkeypatch.setattr(dev, "ensure_classpath", lambda: "cp.jar")
    server = LocalPulsar(java=Path("/opt/jdk/bin/java"), **kwargs)  # type: ignore[arg-type]
    server._data_dir = Path("/nonexistent/data")  # the command names it; nothing is made
    monkeypatch.setattr(dev, "_java_version", lambda _home: 21)
    return server._command()


def test_command_carries_the_default_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = _command(monkeypatch)
    assert cmd[0] == "/opt/jdk/bin/java"
    assert "-XX:+UseZGC" in cmd and "-XX:+ZGenerational" in cmd
    assert cmd.index("-XX:+UseZGC") < cmd.index(dev.MAIN_CLASS)


def test_a_collector_in_extra_args_replaces_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two collectors on one command line: the JVM refuses to start.
    cmd = _command(monkeypatch, extra_jvm_args=["-XX:+UseG1GC", "-XX:MaxGCPauseMillis=10"])
    assert "-XX:+UseG1GC" in cmd and "-XX:MaxGCPauseMillis=10" in cmd
    assert not any(flag.startswith("-XX:+UseZGC") for flag in cmd)
    assert "-XX:+PerfDisableSharedMem" not in cmd


def test_explicit_gc_flags_replace_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = _command(monkeypatch, gc_flags=["-XX:+UseSerialGC"])
    assert "-XX:+UseSerialGC" in cmd
    assert "-XX:+UseZGC" not in cmd
    assert _command(monkeypatch, gc_flags=[]).count("-XX:+UseZGC") == 0
