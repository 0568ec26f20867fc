"""Campaigns with the oracle label source and the in-process trainer: rounds advance, are deterministic and
idempotent, leave a posterior lineage, and their posteriors work with embed / zeroshot / select."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs import campaign as campaign_cli
from pipeline.artifacts.posterior import read_info
from pipeline.bayes.acquisition import epig, select_batch_reference
from pipeline.bayes.metrics import entropy
from pipeline.flows.embed import EmbedConfig, embed
from pipeline.flows.select import SelectConfig, select
from pipeline.flows.zeroshot import ZeroshotConfig, zeroshot
from pipeline.io import tensors
from pipeline.rounds import campaign
from pipeline.rounds.campaign import Campaign
from pipeline.rounds.data import read_cache
from pipeline.rounds.labels import read_rows
from pipeline.selection import candidate_problem
from tests.fixtures_world import World

pytestmark = pytest.mark.slow


def _picks(directory: Path, index: int) -> list[str]:
    return pq.read_table(directory / "rounds" / f"{index:03d}" / "picks.parquet")["sample_id"].to_pylist()


def _stored_map_accuracy(directory: Path) -> float:
    """MAP accuracy of the starting posterior on the campaign's evaluation set, from the embeddings `embed`
    stored (not re-projected activations): the class whose text mean is nearest by cosine (the softmax's
    argmax), against the classes file's label column."""
    cfg, cache = campaign.read_config(str(directory)), read_cache(str(directory))
    text, _ = cache.head(cfg.posterior).text_embeddings(cache.text_acts, cache.text_offset)  # [C, D]
    table = pq.read_table(sorted(Path(str(cfg.eval)).glob("part-*.parquet")), columns=["mean", "shape"])
    mean = torch.tensor(table["mean"].to_pylist(), dtype=torch.float64)  # [N, D]
    cos = torch.nn.functional.normalize(mean, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    truth = torch.tensor([cache.classes.index(y) for y in table["shape"].to_pylist()])
    return float((cos.argmax(dim=1) == truth).double().mean())


def _write_config(path: Path, world: World, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump(world.config(**overrides).model_dump(mode="json")))
    return path


def test_an_oracle_campaign_runs_its_rounds_through_the_cli(
    campaign_world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "camp"
    config = _write_config(tmp_path / "c.yaml", campaign_world, max_rounds=2)
    assert campaign_cli.main(["init", str(directory), "--config", str(config)]) == 0
    assert campaign_cli.main(["run", str(directory), "--rounds", "2"]) == 0
    assert "2 of 2 rounds done" in capsys.readouterr().out

    assert campaign_cli.main(["status", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rounds_completed"] == 2 and report["waiting"] is None
    assert [r["state"] for r in report["rounds"]] == ["updated", "updated"]
    for r, used in zip(report["rounds"], (6, 12), strict=True):
        assert r["labels"]["tasks"] == 6 and r["labels"]["answered"] == 6 and r["labels"]["labelled"] == 6
        assert r["labels_used"] == used  # every round re-fits on ALL labels so far
        for predictive in ("MAP", "Bayes"):
            assert set(r["metrics"][predictive]) == {"accuracy", "nll", "ece", "brier"}
        assert set(r["metrics"]["domains"]) == {"blur"}
    assert report["baseline"]["MAP"]["accuracy"] == pytest.approx(_stored_map_accuracy(directory), abs=1e-12)

    # Picks never repeat; labelled and pushed samples left the pool.
    first, second = _picks(directory, 0), _picks(directory, 1)
    assert len(set(first) | set(second)) == 12
    # The labels table holds one row per oracle answer.
    assert sorted(a.sample_id for a in read_rows(str(directory))) == sorted(first + second)

    # Lineage: each round's posterior names its parent, round, label count and labels digest.
    start = read_info(campaign_world.posterior)["posterior_id"]
    info0 = read_info(directory / "rounds/000/posterior")
    info1 = read_info(directory / "rounds/001/posterior")
    assert info0["lineage"]["parent"] == start and info1["lineage"]["parent"] == info0["posterior_id"]
    assert (info0["lineage"]["round"], info1["lineage"]["round"]) == (0, 1)
    assert (info0["lineage"]["labels"], info1["lineage"]["labels"]) == (6, 12)
    train = json.loads((directory / "rounds/001/train.json").read_text())
    assert info1["lineage"]["labels_digest"] == train["labels_digest"]
    assert report["rounds"][1]["posterior_id"] == info0["posterior_id"]

    # Done: another step changes nothing.
    state = (directory / "state.json").read_text()
    assert campaign_cli.main(["step", str(directory)]) == 0
    assert "nothing to do: 2 rounds done" in capsys.readouterr().out
    assert (directory / "state.json").read_text() == state
    assert campaign_cli.main(["status", str(directory)]) == 0
    assert "2 rounds done" in capsys.readouterr().out


def test_rounds_are_a_pure_function_of_the_start_labels_and_seeds(
    campaign_world: World, tmp_path: Path
) -> None:
    cfg = campaign_world.config(max_rounds=2)
    for name in ("a", "b"):
        campaign.init(str(tmp_path / name), cfg, log=lambda _: None)
        campaign.run(str(tmp_path / name), 2, log=lambda _: None)
    for index in (0, 1):
        assert _picks(tmp_path / "a", index) == _picks(tmp_path / "b", index)
        a = tensors.load(tmp_path / "a" / f"rounds/{index:03d}/projection.safetensors")[0]["weight"]
        b = tensors.load(tmp_path / "b" / f"rounds/{index:03d}/projection.safetensors")[0]["weight"]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # The re-fit moved the projection, and the update merged the labelled curvature.
    start = read_info(campaign_world.posterior)
    info = read_info(tmp_path / "a/rounds/001/posterior")
    assert info["n"]["image"] == start["n"]["image"] + 12 and info["n"]["text"] == start["n"]["text"]
    assert info["image_projection"] is not None


def test_a_round_posterior_works_with_embed_zeroshot_and_select(
    campaign_world: World, tmp_path: Path
) -> None:
    directory = tmp_path / "camp"
    campaign.init(str(directory), campaign_world.config(max_rounds=1), log=lambda _: None)
    campaign.run(str(directory), 1, log=lambda _: None)
    posterior = directory / "rounds/000/posterior"
    classes = str(campaign_world.classes)
    # Embeddings made under the starting projection are stale for it.
    with pytest.raises(ValueError, match="another image projection"):
        select(
            SelectConfig(
                pool=str(campaign_world.pool),
                posterior=str(posterior),
                classes=classes,
                out=str(tmp_path / "s0"),
                tracking=False,
            )
        )
    emb = tmp_path / "emb"
    embed(
        EmbedConfig(
            images=str(campaign_world.images / "pool"),
            posterior=str(posterior),
            out=str(emb),
            executor="local",
            activations=True,
            tracking=False,
        )
    )
    table = pq.read_table(sorted(emb.glob("part-*.parquet"))[0])
    weight = tensors.load(directory / "rounds/000/projection.safetensors")[0]["weight"]
    acts = torch.tensor(table["acts"].to_pylist(), dtype=torch.float64)
    mean = torch.tensor(table["mean"].to_pylist(), dtype=torch.float64)
    torch.testing.assert_close(mean, acts @ weight.T, rtol=1e-4, atol=1e-5)  # float32 storage
    result = select(
        SelectConfig(
            pool=str(emb),
            posterior=str(posterior),
            classes=classes,
            out=str(tmp_path / "s1"),
            budget=3,
            draws=8,
            tracking=False,
        )
    )
    assert result.selected == 3
    zs = ZeroshotConfig(
        embeddings=str(emb), classes=classes, posterior=str(posterior), out=str(tmp_path / "zs"),
        labels="shape", tracking=False,
    )  # fmt: skip
    report = zeroshot(zs)
    assert report.metrics["Bayes"]["n"] == report.n_labelled > 0


@pytest.mark.parametrize("method", ["random", "entropy", "bald", "epig-independent"])
def test_every_acquisition_method_runs_a_round(campaign_world: World, tmp_path: Path, method: str) -> None:
    """Round 0's picks against the method's scores computed here on the same candidate rows: the top
    entropies of the probit predictive, the top EPIG from independent per-logit noise, the plain greedy
    BALD loop, and for random any candidates, scoring nothing."""
    directory = str(tmp_path / method)
    campaign.init(directory, campaign_world.config(method=method, max_rounds=1), log=lambda _: None)
    report = campaign.run(directory, 1, log=lambda _: None)
    assert report.state.completed == 1 and report.state.rounds[0].picked == 6
    picks = pq.read_table(Path(directory) / "rounds/000/picks.parquet").to_pydict()
    ids, scores = picks["sample_id"], picks["score"]

    c = Campaign(directory)  # round 0 selects under the starting posterior with the campaign's seed
    head, text, settings = c.start_head, c.text, c.cfg.selection
    pool, targets = c.rescored(head)
    assert targets is not None
    problem, cand = candidate_problem(head, text, pool, settings, targets=targets)
    assert len(set(ids)) == 6 and set(ids) <= set(cand.sample_ids) and len(cand) < len(pool)  # the kNN step
    at = [cand.sample_ids.index(s) for s in ids]
    if method == "random":
        assert scores == [0.0] * 6
    elif method == "entropy":  # top-k, scored in float32
        h = entropy(problem.probs)  # [Nc], float64
        assert scores == pytest.approx(h[at].tolist(), rel=1e-4)
        rest = [i for i in range(len(cand)) if i not in at]
        assert float(h[at].min()) >= float(h[rest].max()) - 1e-5
    elif method == "epig-independent":  # top-k of independent noise per logit, pool and targets apart
        gen = torch.Generator().manual_seed(settings.seed)
        lp = head.logits(cand.acts, text.acts, image_offset=cand.offsets, text_offset=text.offsets)
        lt = head.logits(targets.acts, text.acts, image_offset=targets.offsets, text_offset=text.offsets)
        s = epig(lp.sample_probs(settings.draws, gen), lt.sample_probs(settings.draws, gen))  # [Nc]
        top = torch.argsort(s, descending=True)[:6].tolist()
        assert ids == [cand.sample_ids[i] for i in top]
        assert scores == pytest.approx(s[top].tolist(), rel=1e-10)
    else:  # BALD: greedy, each pick conditions the posterior before the next is scored
        plain = select_batch_reference(
            head, cand.acts, text.acts, 6, method="bald", k=settings.draws,
            generator=torch.Generator().manual_seed(settings.seed), pool_offsets=cand.offsets,
            text_offset=text.offsets,
        )  # fmt: skip
        assert ids == [cand.sample_ids[i] for i in plain.indices]
        assert scores == pytest.approx(plain.scores, rel=1e-8)


def test_init_is_idempotent_and_refuses_a_different_config(campaign_world: World, tmp_path: Path) -> None:
    directory = str(tmp_path / "camp")
    cfg = campaign_world.config()
    first = campaign.init(directory, cfg, log=lambda _: None)
    assert campaign.init(directory, cfg, log=lambda _: None) == first
    with pytest.raises(FileExistsError, match=r"another configuration \(budget differ\)"):
        campaign.init(directory, campaign_world.config(budget=7), log=lambda _: None)
    # How it runs may change (a new MLflow server, more rounds); what it computes may not.
    campaign.init(directory, campaign_world.config(max_rounds=4, tracking_uri="sqlite:///x.db"), log=print)
    assert campaign.read_config(directory).max_rounds == 4


def test_bad_inputs_are_refused_with_a_clear_message(campaign_world: World, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs `truth`"):
        campaign_world.config(truth=None)
    with pytest.raises(ValueError, match="min_answered"):
        campaign_world.config(min_answered=0)
    with pytest.raises(ValueError, match=r"needs columns 'sample_id' and 'no_such_column'"):
        campaign.init(
            str(tmp_path / "a"), campaign_world.config(truth_column="no_such_column"), log=lambda _: None
        )
    no_acts = tmp_path / "no-acts"
    embed(
        EmbedConfig(
            images=str(campaign_world.images / "targets"),
            posterior=str(campaign_world.posterior),
            out=str(no_acts),
            executor="local",
            tracking=False,
        )
    )
    with pytest.raises(ValueError, match=r"has no 'acts' column \(embed with --activations\)"):
        campaign.init(str(tmp_path / "b"), campaign_world.config(targets=str(no_acts)), log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="not a campaign directory"):
        campaign.status(str(tmp_path / "nowhere"))
