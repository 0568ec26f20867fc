"""The embeddings reader that Ray Data's read tasks run imports neither torch nor Ray: those workers start in
a fraction of the time (the scoring actors import torch; the readers beside them need not)."""

from __future__ import annotations

import subprocess
import sys


def test_the_embeddings_reader_imports_no_torch_or_ray() -> None:
    code = (
        "import sys, pipeline.stages.embedding_read, pipeline.io.vectors; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vectors_still_make_tensors_and_take_them() -> None:
    import pyarrow as pa
    import torch

    from pipeline.io import vectors

    values = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    table = pa.table({"v": vectors.vector_column(values)})
    assert torch.equal(vectors.tensor(table, "v"), values)
    assert vectors.tensor(table, "v", torch.float32).dtype == torch.float32
