"""`bayescurate select`: choose the pool images humans label next and send them to Label Studio."""

from __future__ import annotations

from jobs._app import ConfigCommand
from pipeline.flows.select import SelectConfig, select

CONFIG = SelectConfig


def run(cfg: SelectConfig) -> int:
    """Choose the pool images humans should label next (EPIG/BALD) and send them to Label Studio."""
    r = select(cfg)
    print(
        f"selected {r.selected} of {r.candidates} candidates "
        f"(pool {r.pool}, targets {r.targets}) by {r.method}"
    )
    if r.label_studio:
        ls = r.label_studio
        print(f"Label Studio: {ls['created']} new tasks, {ls['skipped']} already there: {ls['url']}")
    if r.mlflow_run_id:
        print(f"MLflow run {r.mlflow_run_id} (experiment {cfg.experiment!r})")
    return 0


main = ConfigCommand(SelectConfig, run, "bayescurate select")

if __name__ == "__main__":
    raise SystemExit(main())
