"""Run every benchmark: `python -m bench` (add --quick for a short run)."""

from __future__ import annotations

import argparse

from bench import bank_bench, bookkeeper_bench, embedded_bench, pulsar_bench, validator_bench

parser = argparse.ArgumentParser(prog="python -m bench")
parser.add_argument("--quick", action="store_true", help="shorter runs (rougher figures)")
parser.add_argument(
    "--only", choices=["validator", "embedded", "pulsar", "bookkeeper", "bank"], default=None
)
args = parser.parse_args()

if args.only in (None, "validator"):
    validator_bench.main(100_000 if args.quick else 300_000)
if args.only in (None, "embedded"):
    embedded_bench.main(seconds=4.0 if args.quick else 10.0)
if args.only in (None, "pulsar"):
    pulsar_bench.main(seconds=4.0 if args.quick else 10.0, max_warmup=30.0 if args.quick else 150.0)
if args.only in (None, "bookkeeper"):
    bookkeeper_bench.main(seconds=4.0 if args.quick else 8.0)
if args.only in (None, "bank"):
    bank_bench.main(seconds=4.0 if args.quick else 10.0)
