"""Run by test_multinode.py in a fresh process: a head + 2 worker nodes `ray.cluster_utils.Cluster`,
fit-posterior on it and in-process, then `embed` and `curate` on it and curate in-process, then print a
JSON report (factor differences, the two curated sets, nodes that did work)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray writes the cluster address under its temp root: keep it out of the shared /tmp/ray.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bcmn", dir="/tmp")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def wait_idle(cpus: float, timeout: float = 120.0) -> None:
    """Until every CPU of the cluster is free again: the actors of the job before are released
    asynchronously, and tasks placed while they still hold their node's CPU would all land elsewhere."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)


def main(work: str) -> None:
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from jobs import curate, embed, fit_posterior, make_world
    from pipeline import runtime
    from pipeline.artifacts.factors import load_factors
    from pipeline.artifacts.posterior import read_info

    model = "factory:tests.stages.standin:load"
    make_world.main(["--out", f"{work}/world", "--n", "600", "--per-file", "200"])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
        )
        runtime.configure_data(progress=False)
        all_nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        args = [
            "--pairs",
            f"{work}/world",
            "--model",
            model,
            "--block-size",
            "50",
            "--rows-per-shard",
            "50",
            "--no-tracking",
        ]
        rc_cluster = fit_posterior.main([*args, "--out", f"{work}/cluster"])
        wait_idle(3)
        emb = ["--images", f"{work}/world", "--posterior", f"{work}/cluster", "--out", f"{work}/emb"]
        rc_embed = embed.main([*emb, "--activations", "--rows-per-shard", "100", "--no-tracking"])
        pick = ["--pool", f"{work}/emb", "--targets", f"{work}/emb", "--posterior", f"{work}/cluster"]
        pick += ["--classes", f"{work}/world/classes/shape.json", "--budget", "20", "--batch", "stochastic"]
        pick += ["--draws", "8", "--rows-per-shard", "40", "--batch-size", "40", "--no-tracking"]
        wait_idle(3)
        rc_curate = curate.main([*pick, "--out", f"{work}/curated-cluster"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    rc_local = fit_posterior.main([*args, "--out", f"{work}/local", "--executor", "local"])
    rc_curate_local = curate.main([*pick, "--out", f"{work}/curated-local", "--executor", "local"])
    curated = {
        where: json.loads(Path(f"{work}/curated-{where}/curate.json").read_text())
        for where in ("cluster", "local")
    }
    picks = {
        where: pq.read_table(f"{work}/curated-{where}/curated.parquet")["sample_id"].to_pylist()
        for where in ("cluster", "local")
    }
    diffs = {}
    for tower in ("image", "text"):
        a = load_factors(f"{work}/cluster/{tower}.safetensors")
        b = load_factors(f"{work}/local/{tower}.safetensors")
        diffs[tower] = {
            "A": float((a.A - b.A).abs().max()),
            "B": float((a.B - b.B).abs().max()),
            "scale": float(b.B.abs().max()),
            "n": [a.n, b.n],
        }
    nodes = read_info(f"{work}/cluster")["data"]["nodes"]
    print(
        "REPORT "
        + json.dumps(
            {
                "rc": [rc_cluster, rc_local],
                "diffs": diffs,
                "nodes": nodes,
                "all_nodes": all_nodes,
                "curate_rc": [rc_embed, rc_curate, rc_curate_local],
                "curate_nodes": curated["cluster"]["nodes"],
                "picks": picks,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
