"""open_clip models as BayesVLM sees them: `load_model(name) -> ClipAdapter` (activations, projections,
scale and bias of each tower), the shipped configs and the tiny pretrained checkpoint (`TINY_MODEL`).

Import `pipeline.models.adapter` for the API; this package file stays light so that importing
`pipeline.models.registry` for a path does not build anything.
"""
