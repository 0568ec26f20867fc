"""`bayescurate bench pipeline`: the Ray embed path against a plain single-process torch loop, in one run.

Reports rows/s of each and their ratio, the Bayesian overhead (embed with variance vs deterministic, both
on Ray), where the time of the plain loop goes (decode vs model, to explain any gap), Ray start-up, and the
peak resident memory of the whole run (driver + Ray workers) at each corpus size (streaming: it must not
grow with the corpus).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import pyarrow.parquet as pq
import torch
import typer
from PIL import Image

from connectors import storage
from jobs import embed, fit_posterior, make_world
from jobs._app import run_command
from pipeline import runtime
from pipeline.stages.embed import ModelSpec


class MemorySampler:
    """Peak of the summed RSS of this process and every Ray process on the machine, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_mb() -> float:
        import os

        total, me = 0, os.getpid()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                if (
                    int(entry.name) != me
                    and b"ray" not in cmd
                    and b"raylet" not in cmd
                    and b"gcs_server" not in cmd
                ):
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, ValueError):
                continue
        return total / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            time.sleep(0.05)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(images: str, model: ModelSpec, batch_size: int) -> dict[str, float]:
    """Read Parquet -> PIL decode -> preprocess -> model, deterministic embeddings, one process."""
    adapter = model.load()
    weight = adapter.image_weight().detach()
    start = time.perf_counter()
    decode_s = model_s = 0.0
    rows = 0
    for path in storage.list_files(images, suffix=".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["image"]):
            t0 = time.perf_counter()
            pixels = torch.stack(
                [
                    adapter.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                    for b in batch.column("image").to_pylist()
                    if b
                ]
            )
            t1 = time.perf_counter()
            with torch.inference_mode():
                feats = adapter.image_features(pixels)
                mean = feats.acts @ weight.T.to(feats.acts)
                if feats.offset is not None:
                    mean = mean + feats.offset
                _ = mean.numpy()
            model_s += time.perf_counter() - t1
            decode_s += t1 - t0
            rows += len(pixels)
    total = time.perf_counter() - start
    return {
        "rows": rows,
        "seconds": total,
        "rows_per_s": rows / total,
        "decode_s": decode_s,
        "model_s": model_s,
    }


def command(
    out: Annotated[str, typer.Option(help="Work directory (corpus, posterior, outputs, report).")],
    n: Annotated[
        list[int] | None, typer.Option(help="Corpus sizes (repeatable): --n 10000 --n 50000.")
    ] = None,
    model: Annotated[str, typer.Option(help="Model name.")] = "bayescurate-tiny",
    pretrained: Annotated[str | None, typer.Option(help="Weights path or tag.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per model call.")] = 256,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per shard.")] = 2048,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray.")] = None,
) -> int:
    """Benchmark the Ray embed pipeline against a plain torch loop."""
    work = Path(out)
    posterior = work / "posterior"
    spec = ModelSpec(model, pretrained)
    report: dict[str, Any] = {"model": model, "batch_size": batch_size, "sizes": {}}
    t0 = time.perf_counter()
    started = runtime.init_ray(None, num_cpus)
    report["ray_init_s"] = time.perf_counter() - t0
    try:
        for size in n or [10000]:
            corpus = work / f"world-{size}"
            if not (corpus / "classes").exists():
                make_world.main(["--out", str(corpus), "--n", str(size), "--per-file", "5000"])
            if not (posterior / "posterior.json").exists():
                fit_posterior.main(
                    [
                        "--pairs",
                        str(corpus),
                        "--model",
                        model,
                        *(["--pretrained", pretrained] if pretrained else []),
                        "--out",
                        str(posterior),
                        "--block-size",
                        "256",
                        "--executor",
                        "local",
                        "--no-tracking",
                    ]
                )
            entry: dict[str, Any] = {"plain": plain_loop(str(corpus), spec, batch_size)}
            for name, extra in (("ray_bayes", []), ("ray_deterministic", ["--no-variance"])):
                target = work / f"emb-{size}-{name}"
                storage.remove(str(target))
                cfg = embed.load_config(
                    embed.EmbedConfig,
                    None,
                    images=str(corpus),
                    out=str(target),
                    posterior=str(posterior),
                    variance=not extra,
                    rows_per_shard=rows_per_shard,
                    batch_size=batch_size,
                )
                with MemorySampler() as mem:
                    summary = embed.embed_corpus(cfg)
                entry[name] = {
                    "rows": summary["embedded"],
                    "seconds": summary["seconds"],
                    "rows_per_s": summary["embedded"] / summary["seconds"],
                    "setup_s": summary["setup_s"],
                    "peak_rss_mb": mem.peak_mb,
                }
            entry["ratio_ray_vs_plain"] = entry["ray_bayes"]["rows_per_s"] / entry["plain"]["rows_per_s"]
            entry["ratio_ray_deterministic_vs_plain"] = (
                entry["ray_deterministic"]["rows_per_s"] / entry["plain"]["rows_per_s"]
            )
            entry["bayes_overhead"] = (
                entry["ray_bayes"]["seconds"] / entry["ray_deterministic"]["seconds"] - 1
            )
            report["sizes"][str(size)] = entry
            print(json.dumps({str(size): entry}, indent=2))
    finally:
        if started:
            import ray

            ray.shutdown()
    storage.write_json(work / "bench_pipeline.json", report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(command, argv, "bayescurate bench pipeline")


if __name__ == "__main__":
    raise SystemExit(main())
