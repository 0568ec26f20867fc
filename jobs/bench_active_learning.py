"""`bayescurate bench active-learning`: accuracy per label of the acquisition functions, in real campaigns.

The experiment is `pipeline.experiments.active_learning` (the world, the campaigns, the analysis and the
outputs under `--out`: `results.json`, `curves.png`, `summary.md`); this is its command line.
"""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.experiments.active_learning import ActiveLearningConfig, run


def main_run(cfg: ActiveLearningConfig) -> int:
    """Accuracy per label of random, entropy, BALD, EPIG (greedy and stochastic batches) and
    EPIG-independent in oracle campaigns."""
    cfg = cfg.effective()  # --quick: the smoke-run sizes, below anything the config file or a flag set
    doc = run(cfg)
    for g in doc["goals"]:
        print(f"goal: {g['goal']}: {g['met']}; {g['detail']}")
    print(f"wrote {cfg.out}/summary.md, results.json, curves.png ({doc['seconds']:.0f} s)")
    return 0


CONFIG = ActiveLearningConfig
main = ConfigCommand(ActiveLearningConfig, main_run, "bayescurate bench active-learning")

if __name__ == "__main__":
    raise SystemExit(main())
