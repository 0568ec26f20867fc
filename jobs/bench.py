"""`bayescurate bench core|calibration|pipeline`: the benchmarks whose figures the README reports."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHES: dict[str, tuple[str, str]] = {
    "core": ("jobs.bench_core", "GGN fast path vs per-sample formula; Bayesian overhead of embeddings."),
    "calibration": ("jobs.bench_calibration", "MAP vs Bayesian calibration of the tiny model under shift."),
    "pipeline": ("jobs.bench_pipeline", "Ray embed throughput vs a plain torch loop; memory at scale."),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHES:
        if args and args[0] not in ("-h", "--help"):
            print(f"error: unknown benchmark {args[0]!r}", file=sys.stderr)
        print("usage: bayescurate bench {" + ",".join(BENCHES) + "} [ARGS]...\n")
        for name, (_, desc) in BENCHES.items():
            print(f"  {name.ljust(12)} {desc}")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHES[args[0]][0])
    return int(module.main(args[1:]))
