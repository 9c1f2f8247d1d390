"""The ``ledgerlog`` command. Errors print as one line, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click
import structlog

from ledgerlog import _CurrentStderr
from ledgerlog.backends.base import Backend
from ledgerlog.client import open_backend
from ledgerlog.codec import decode_record
from ledgerlog.errors import FormatError, LedgerlogError
from ledgerlog.model import START, Decision, EpochStart, Transaction
from ledgerlog.reader import Reader
from ledgerlog.validator import EntryResult, ValidatorState, process_entry
from ledgerlog.writer import HLC


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
    )


#: Signals on which ``ledgerlog writer`` stops gracefully.
_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)


def _backend(target: str, create: bool = False) -> Backend:
    options: dict[str, Any] = {}
    if "://" not in target or target.startswith("file://"):
        options["create"] = create
    return open_backend(target, **options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics while the command runs.",
)
@click.version_option(package_name="ledgerlog")
def cli(verbose: int, metrics_port: int | None) -> None:
    """ledgerlog: a serializable transaction log on a local file log, Pulsar or BookKeeper.

    LEDGER is a directory (the embedded backend) or a pulsar:// / bookkeeper:// URL.
    """
    _configure_logging(verbose)
    if metrics_port is not None:
        from ledgerlog.metrics import serve

        serve(metrics_port)


@cli.command()
@click.option(
    "--ledger",
    "--path",
    "path",
    default=None,
    help="Ledger directory or URL (default: a temporary embedded ledger).",
)
@click.option("--workers", default=3, show_default=True, help="Client processes.")
@click.option("--threads", default=8, show_default=True, help="Threads per client process.")
@click.option("--accounts", default=1000, show_default=True, help="Bank accounts.")
@click.option("--seconds", default=10.0, show_default=True, help="How long to run.")
@click.option("--keep", is_flag=True, help="Keep the temporary ledger afterwards.")
def demo(
    path: str | None, workers: int, threads: int, accounts: int, seconds: float, keep: bool
) -> None:
    """Move money between accounts from several processes; check money and replicas."""
    from ledgerlog.cli.demo import run_demo

    run_demo(path, workers, threads, accounts, seconds, keep=keep)


def _describe_txn(t: Transaction) -> str:
    parts = [f"read@{t.read_version}"]
    if t.reads:
        parts.append("reads " + ",".join(t.reads))
    if t.ranges:
        parts.append("ranges " + ",".join(f"[{r.start},{r.end or ''})" for r in t.ranges))
    if t.writes:
        parts.append(f"{len(t.writes)} writes")
    if t.events:
        parts.append(f"{len(t.events)} events")
    return " ".join(parts)


def _results(
    backend: Backend, follow: bool, from_seq: int, window: int
) -> Iterator[tuple[Any, EntryResult]]:
    """(entry, result) for every entry, validating from the start (tail/inspect)."""
    state = ValidatorState(window)
    with backend.reader(START) as r:
        while True:
            entries = r.read(1024, timeout=0.2 if follow else 0.0)
            if not entries:
                if follow:
                    continue
                return
            for e in entries:
                res = process_entry(state, e.data)
                seqs = res.seqs
                if res.kind != "record" or not seqs or seqs[-1] >= from_seq:
                    yield e, res


def _decision_line(d: Decision) -> str:
    return d.describe()


@cli.command()
@click.argument("ledger")
@click.option("--from-seq", default=1, show_default=True, help="First seq to show.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep tailing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per decision.")
@click.option("--window", default=100_000, show_default=True, help="Validator window (seqs).")
def tail(ledger: str, from_seq: int, follow: bool, as_json: bool, window: int) -> None:
    """Print decisions as they happen."""
    backend = _backend(ledger)
    for _entry, res in _results(backend, follow, from_seq, window):
        for d in res.decisions:
            if d.seq is not None and d.seq < from_seq:
                continue
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "type": "decision",
                            "seq": d.seq,
                            "txn_id": str(d.txn_id) if d.txn_id else None,
                            "outcome": d.outcome.value,
                            "reason": d.reason.value if d.reason else None,
                            "conflict_key": d.conflict_key,
                            "conflict_seq": d.conflict_seq,
                            "detail": d.detail,
                        }
                    )
                )
            else:
                click.echo(_decision_line(d))
        if res.kind == "epoch":
            if as_json:
                click.echo(
                    json.dumps({"type": "epoch", "epoch": res.epoch, "writer_id": res.writer_id})
                )
            else:
                click.echo(f"-- epoch {res.epoch} started by writer {res.writer_id}")


@cli.command()
@click.argument("ledger")
@click.option("--from-seq", default=1, show_default=True, help="First seq to show.")
@click.option("--limit", default=20, show_default=True, help="Entries to show.")
@click.option("--window", default=100_000, show_default=True, help="Validator window (seqs).")
def inspect(ledger: str, from_seq: int, limit: int, window: int) -> None:
    """Print records and their decisions from a seq."""
    backend = _backend(ledger)
    shown = 0
    for entry, res in _results(backend, False, from_seq, window):
        if shown >= limit:
            break
        shown += 1
        try:
            rec = decode_record(entry.data)
        except FormatError as exc:
            click.echo(f"@{entry.position} MALFORMED entry ({len(entry.data)} bytes): {exc}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(HLC.to_unix_ms(rec.hlc) / 1000))
        if isinstance(rec, EpochStart):
            verdict = "accepted" if res.kind == "epoch" else f"REJECTED ({res.detail})"
            click.echo(
                f"@{entry.position} epoch start {rec.epoch} by {rec.writer_id} at {when}Z: "
                f"{verdict}"
            )
            continue
        head = (
            f"@{entry.position} record epoch {rec.epoch} seqs {rec.first_seq}.."
            f"{rec.first_seq + len(rec.transactions) - 1} by {rec.writer_id} at {when}Z"
        )
        if res.kind != "record":
            head += f": REJECTED ({res.detail})"
        click.echo(head)
        for t, d in zip(rec.transactions, res.decisions, strict=False):
            what = _describe_txn(t) if isinstance(t, Transaction) else f"<{len(t)} bad bytes>"
            click.echo(f"    {d.describe()}: {what}")


@cli.command()
@click.argument("ledger")
@click.option("--window", default=100_000, show_default=True, help="Validator window (seqs).")
def verify(ledger: str, window: int) -> None:
    """Replay the whole ledger and print its digest and decision counts."""
    backend = _backend(ledger)
    reader = Reader(backend, window=window, name="verify")
    counts: Counter[str] = Counter()

    def tally(results: Any) -> None:
        for res in results:
            if res.kind == "record":
                for o in res.outcomes:
                    counts[
                        ("committed", "conflict", "too_old", "duplicate", "malformed")[o[2]]
                    ] += 1
            else:
                counts[f"{res.kind} entries"] += 1

    reader.subscribe(tally)
    t0 = time.perf_counter()
    while reader.poll(timeout=0.0, max_entries=4096):
        pass
    dt = time.perf_counter() - t0
    click.echo(f"ledger:  {backend.url}")
    click.echo(f"seq:     {reader.last_seq}")
    click.echo(f"epoch:   {reader.state.epoch}")
    click.echo(f"digest:  {reader.digest.hex()}")
    click.echo("counts:  " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    rate = reader.last_seq / dt if dt > 0 else 0.0
    click.echo(f"replay:  {dt:.2f}s ({rate:,.0f} txn/s)")
    reader.close()


@cli.command()
@click.argument("ledger")
@click.option("--writer-id", default=None, help="Name of this writer (default: host-pid).")
def writer(ledger: str, writer_id: str | None) -> None:
    """Run a writer for LEDGER in the foreground (standby until elected)."""
    from ledgerlog.client import default_client_id
    from ledgerlog.writer import Writer

    backend = _backend(ledger, create=True)
    w = Writer(backend, writer_id or default_client_id())
    click.echo(f"writer {w.writer_id} standing by for {backend.url}", err=True)
    stopping: list[int] = []

    def stop_gracefully(signum: int, _frame: object) -> None:
        # A service manager stops a daemon with SIGTERM: without this the process died
        # at once (status -15), its appends in flight unretired and its term not handed
        # back. A second signal means "now".
        if stopping:
            os._exit(128 + signum)
        stopping.append(signum)
        click.echo(
            f"writer {w.writer_id}: {signal.Signals(signum).name}: letting appends in flight "
            "land, then resigning (send it again to stop at once)",
            err=True,
        )
        w.stop()

    # Handlers can only be set from the main thread (``main()`` may run in another).
    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop_gracefully) for sig in _STOP_SIGNALS if on_main}
    try:
        w.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        backend.close()
    click.echo(f"writer {w.writer_id} stopped", err=True)


@cli.group()
def check() -> None:
    """Consistency checks: run workloads under faults, check histories."""


@check.command("run")
@click.argument("ledger")
@click.option(
    "--workload",
    type=click.Choice(["list-append", "bank"]),
    default="list-append",
    show_default=True,
)
@click.option("--clients", default=2, show_default=True, help="Client processes.")
@click.option("--threads", default=3, show_default=True, help="Threads per client process.")
@click.option("--writers", default=2, show_default=True, help="Writer processes (standbys).")
@click.option("--seconds", default=20.0, show_default=True, help="How long to run.")
@click.option(
    "--faults",
    default="",
    help="Comma-separated: kill-writer, pause-writer, kill-client (restart-broker,"
    " pause-broker and proxy need servers started by the harness's Python API).",
)
@click.option("--seed", default=None, type=int, help="Random seed (default: from the clock).")
@click.option("--out", "out_dir", default=None, help="Run directory (history.json goes there).")
@click.option(
    "--realtime/--no-realtime",
    default=True,
    show_default=True,
    help="Also check strict serializability for clients that sync().",
)
@click.option("--lease-timeout", default=None, type=float, help="Embedded writers' lease (s).")
def check_run(
    ledger: str,
    workload: str,
    clients: int,
    threads: int,
    writers: int,
    seconds: float,
    faults: str,
    seed: int | None,
    out_dir: str | None,
    realtime: bool,
    lease_timeout: float | None,
) -> None:
    """Drive concurrent clients on LEDGER under faults, record a history, check it."""
    import tempfile
    from pathlib import Path

    from ledgerlog.check.run import RunConfig, parse_faults, run_check

    options: dict[str, Any] = {}
    if lease_timeout is not None:
        options["lease_timeout"] = lease_timeout
    cfg = RunConfig(
        url=ledger,
        out_dir=Path(out_dir or tempfile.mkdtemp(prefix="ledgerlog-check-")),
        workload=workload,
        clients=clients,
        threads=threads,
        writers=writers,
        seconds=seconds,
        faults=parse_faults(faults),
        seed=seed if seed is not None else time.time_ns() % 1_000_000,
        realtime=realtime,
        backend_options=options,
    )
    try:
        report = run_check(cfg)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not report.valid:
        raise SystemExit(1)


@check.command("history")
@click.argument("history")
@click.option("--realtime", is_flag=True, help="Also check strict serializability.")
def check_history(history: str, realtime: bool) -> None:
    """Check a list-append history file (as ``python -m ledgerlog.check``)."""
    from ledgerlog.check.__main__ import main as check_main

    code = check_main([history, *(["--realtime"] if realtime else [])])
    if code:
        raise SystemExit(code)


@cli.group()
def dev() -> None:
    """Real servers on 127.0.0.1 for development (JVM processes from Maven jars)."""


@dev.command(
    "pulsar",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def dev_pulsar(ctx: click.Context) -> None:
    """Run a Pulsar standalone until Ctrl-C (options: --help)."""
    from ledgerlog.devservers import pulsar

    code = pulsar.main(ctx.args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning every expected failure into one line."""
    try:
        cli.main(args=argv, prog_name="ledgerlog", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ledgerlog: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (LedgerlogError, OSError, TimeoutError) as exc:
        click.echo(f"ledgerlog: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
