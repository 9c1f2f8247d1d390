"""Views: where committed transactions are materialized, each exactly once.

:class:`MemoryView` (in memory, fastest), :class:`SQLiteView` (a durable file, the
default for services), :class:`PostgresView` (tables in a PostgreSQL database; psycopg 3
is imported when one is opened) and :class:`HandlerView` (your function per transaction)
all follow the :class:`View` contract: data and :class:`Checkpoint` are stored in one
atomic step.
"""

from ledgerlog.views.base import Checkpoint, View
from ledgerlog.views.handler import HandlerView
from ledgerlog.views.memory import MemoryView
from ledgerlog.views.postgres import PostgresView
from ledgerlog.views.sqlite import SQLiteView

__all__ = ["Checkpoint", "HandlerView", "MemoryView", "PostgresView", "SQLiteView", "View"]
