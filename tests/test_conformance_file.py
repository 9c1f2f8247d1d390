"""The backend conformance suite on the embedded file backend."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledgerlog.backends.base import Backend
from ledgerlog.backends.file import FileBackend
from ledgerlog.testing.conformance import *  # noqa: F403
from ledgerlog.testing.conformance import Harness


class FileHarness(Harness):
    takeover_timeout = 10.0

    def __init__(self, root: Path) -> None:
        self.root = root
        self._n = itertools.count()

    def new_ledger(self) -> str:
        return f"ledger-{next(self._n)}"

    def open(self, ledger: str) -> Backend:
        return FileBackend(self.root / ledger, lease_timeout=2.0)

    def depose(self, backend: Backend) -> None:
        # A hung writer stops refreshing its lease: age the lease instead of waiting.
        assert isinstance(backend, FileBackend)
        os.utime(backend.path / "writer.lock", (0, 0))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = FileHarness(tmp_path)
    yield h
    h.close()
