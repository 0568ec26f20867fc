"""Annotation campaigns: rounds of select -> push -> collect -> train -> update, as a resumable state machine.

`config` (what a campaign is), `layout` (the campaign directory: `CampaignDir`, each round's `RoundFiles`,
where every file lives), `state` (where it stands: the records of `state.json`, written last at every
transition), `lease` (one stepper at a time), `labels` (the append-only labels table and how answers
resolve), `sources` (Label Studio or an oracle), `data` (the cached activations a round re-scores),
`evaluation` (metrics after each update), `tracking` (MLflow per round), `status` (what `campaign status`
reports, as `CampaignStatus`), `campaign` (init, step, run), `webhook` (the webhook's shared secret) and
`serve` (the webhook server that steps a campaign; it imports `campaign`, never the reverse).
"""
