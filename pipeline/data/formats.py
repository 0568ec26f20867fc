"""How a corpus is laid out on disk: the one format enum that readers (`sources`) and writers share."""

from __future__ import annotations

from enum import Enum


class CorpusFormat(str, Enum):
    """Layout of an image corpus, read by `pipeline.data.sources` and written by `pipeline.data.writers`."""

    PARQUET = "parquet"
    """Parquet files: sample_id, image bytes (or a path/URI column), an optional caption, label columns."""
    FOLDER = "folder"
    """A folder of image files, captions in `captions.jsonl`/`captions.csv` or `<stem>.txt` sidecars."""
    WEBDATASET = "webdataset"
    """Tar files whose members `<key>.<ext>` group into samples (`png`/`jpg`, `txt`, `json`, `cls`)."""
