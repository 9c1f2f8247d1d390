"""sync() on the embedded backend when a replica starts far behind the ledger's end.

Regression: a cursor remembered that its last read had stopped in front of bytes that
did not form a frame (there, the 4 MiB read limit cutting the next frame), even after
it returned early with many complete frames still unread (1,024 entries per poll); a
reader's sync() then took that for "caught up at a torn tail" and returned at the first
poll's seq, so reads after sync() missed committed transactions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import ledgerlog
from ledgerlog.backends.file import FileBackend


@pytest.mark.timeout(120)
def test_sync_from_far_behind_reaches_the_end(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    records = 1_200  # more than one poll's 1,024 entries
    value = "v" * 4_000  # and more than one 4 MiB read of bytes in all
    with ledgerlog.open(FileBackend(path, fsync=False), client_id="w") as db:
        db.wait_writer()
        for i in range(records):
            with db.transaction() as tx:  # one record per commit: it waits
                tx.put(f"k{i:05d}", value)
        end_seq = db.sync()
        assert end_seq == records
    with ledgerlog.open(FileBackend(path, fsync=False), client_id="late", writer=None) as db:
        assert db.sync(timeout=60) == end_seq
        assert db.get(f"k{records - 1:05d}") == value
        assert len(db.range("k", "l")) == records
