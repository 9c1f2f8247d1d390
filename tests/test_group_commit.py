"""The intake producers' group commit: shared flushes, and failures reach every submitter
whose item was in the failed flush."""

from __future__ import annotations

import threading
import time

import pytest

from ledgerlog.backends.base import GroupCommit
from ledgerlog.errors import BackendError, ClosedError


@pytest.mark.timeout(30)
def test_a_failed_flush_fails_every_item_in_it_even_after_a_later_success() -> None:
    flushes: list[list[bytes]] = []
    first_may_finish = threading.Event()
    fail_next = threading.Event()

    def flush(items: list[bytes]) -> None:
        flushes.append(list(items))
        if len(flushes) == 1:
            first_may_finish.wait(10)
        elif fail_next.is_set():
            fail_next.clear()
            raise OSError("disk full")

    gc = GroupCommit(flush)
    results: dict[str, BaseException | None] = {}

    def submit(name: str) -> None:
        try:
            gc.submit(name.encode(), timeout=10)
            results[name] = None
        except BaseException as exc:
            results[name] = exc

    a = threading.Thread(target=submit, args=("a",))
    a.start()
    while not flushes:
        time.sleep(0.001)
    # b and c queue behind a's flush and will share the next one, which fails.
    others = [threading.Thread(target=submit, args=(n,)) for n in ("b", "c")]
    for t in others:
        t.start()
    deadline = time.monotonic() + 5
    while len(gc._pending) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    fail_next.set()
    first_may_finish.set()
    for t in (a, *others):
        t.join(10)
    submit("d")  # a later flush succeeds; it must not acknowledge b and c
    assert flushes == [[b"a"], [b"b", b"c"], [b"d"]]
    assert results["a"] is None and results["d"] is None
    for name in ("b", "c"):
        exc = results[name]
        assert isinstance(exc, BackendError) and "disk full" in str(exc)
    assert gc.close() and not gc.close()
    with pytest.raises(ClosedError):
        gc.submit(b"e")
