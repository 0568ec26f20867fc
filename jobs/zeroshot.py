"""`bayescurate zeroshot`: calibrated zero-shot classification of embedded images with ProbCosine."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.flows.zeroshot import ZeroshotConfig, zeroshot

CONFIG = ZeroshotConfig


def run(cfg: ZeroshotConfig) -> int:
    """Calibrated zero-shot classification with ProbCosine (MAP vs Bayes metrics with a label column)."""
    r = zeroshot(cfg)
    print(f"zero-shot over {len(r.classes)} classes, {r.files} files -> {cfg.out}")
    for kind, values in r.metrics.items():
        print(f"  {kind:5s} " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return 0


main = ConfigCommand(ZeroshotConfig, run, "bayescurate zeroshot")

if __name__ == "__main__":
    raise SystemExit(main())
