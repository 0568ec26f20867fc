"""Annotation campaigns: rounds of select -> push -> collect -> train -> update, as a resumable state machine.

`config` (what a campaign is), `state` (where it stands: `state.json`, written last at every transition),
`lease` (one stepper at a time), `labels` (the append-only labels table and how answers resolve),
`sources` (Label Studio or an oracle), `data` (the cached activations a round re-scores), `evaluation`
(metrics after each update), `tracking` (MLflow per round) and `campaign` (init, step, run, status).
"""
