"""``python -m ledgerlog.check HISTORY.json [--realtime]``: print the verdict.

Exit status: 0 valid, 1 anomalies found, 2 the history could not be read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ledgerlog.check import History, HistoryError, check_list_append


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ledgerlog.check",
        description="Check a list-append history (Elle's JSON form) for isolation anomalies.",
    )
    parser.add_argument("history", help="a JSON array or JSON-lines file of operations")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="also check strict serializability (real-time order between transactions)",
    )
    args = parser.parse_args(argv)
    try:
        history = History.load(args.history)
        verdict = check_list_append(history, realtime=args.realtime)
    except HistoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(verdict.format())
    return 0 if verdict.valid else 1


if __name__ == "__main__":
    sys.exit(main())
