"""Ray-agnostic pipeline stages (read, decode, embed, pair features, factor accumulation) and their runners.

A stage is a plain callable on column batches (`dict[str, numpy.ndarray]`) that declares its resources;
`pipeline.stages.local` runs stages in-process, `pipeline.stages.ray_adapter` turns them into Ray Data
`map_batches` operators. Nothing here but `ray_adapter` imports Ray.
"""
