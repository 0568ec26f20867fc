"""Input and output: the one storage layer (`storage`), Parquet vector columns (`vectors`), tensor files
(`tensors`) and the crash-test hook every write passes (`faults`)."""
