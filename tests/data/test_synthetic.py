"""The synthetic world: determinism, caption/label agreement, and shifts that grow with severity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data import synthetic
from pipeline.data.synthetic import Domain, World


def _pixels(sample: synthetic.Sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.float64)


def test_same_seed_same_bytes_and_ids() -> None:
    a = list(World(7).generate(12))
    b = list(synthetic.generate(12, seed=7))
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.sample_id for s in a] == [f"syn-7-clean-0-{i}" for i in range(12)]
    # Random access gives the same sample as streaming.
    assert World(7).sample(5).image.tobytes() == a[5].image.tobytes()
    # `start` continues the same stream.
    tail = list(synthetic.generate(4, seed=7, start=8))
    assert [s.image.tobytes() for s in tail] == [s.image.tobytes() for s in a[8:]]


def test_different_seeds_differ() -> None:
    a = [s.image.tobytes() for s in synthetic.generate(8, seed=1)]
    b = [s.image.tobytes() for s in synthetic.generate(8, seed=2)]
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_images_are_small_rgb() -> None:
    sample = World(0).sample(0)
    assert sample.image.mode == "RGB"
    assert sample.image.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)


def test_stream_is_lazy() -> None:
    first = list(itertools.islice(synthetic.generate(10**12, seed=3), 3))
    assert len(first) == 3


@pytest.mark.parametrize("domain", [Domain.CLEAN, Domain.UNSEEN_TEXTURES])
def test_captions_agree_with_labels(domain: Domain) -> None:
    severity = 0 if domain is Domain.CLEAN else 2
    textures = synthetic.TRAIN_TEXTURES if domain is Domain.CLEAN else synthetic.UNSEEN_TEXTURES
    for s in synthetic.generate(200, seed=11, domain=domain, severity=severity):
        mentioned = synthetic.caption_attributes(s.caption)
        assert mentioned, s.caption
        assert all(s.labels[k] == v for k, v in mentioned.items()), (s.caption, s.labels)
        assert s.labels["shape"] in synthetic.class_names("shape")
        assert s.labels["colour"] in synthetic.class_names("colour")
        assert s.labels["size"] in synthetic.class_names("size")
        assert s.labels["texture"] in textures


def test_every_class_occurs() -> None:
    labels = [s.labels for s in synthetic.generate(400, seed=5)]
    for task in synthetic.TASKS:
        assert {lab[task] for lab in labels} == set(synthetic.class_names(task))


def test_shifted_domains_keep_the_scene() -> None:
    world = World(4)
    for domain in synthetic.SHIFTED_DOMAINS:
        for i in range(10):
            clean, shifted = world.sample(i), world.sample(i, domain, 3)
            for key in ("shape", "colour", "size"):
                assert clean.labels[key] == shifted.labels[key]
            assert shifted.sample_id == f"syn-4-{domain.value}-3-{i}"


@pytest.mark.parametrize("domain", [Domain.NOISE, Domain.BLUR, Domain.COLOUR_JITTER])
def test_corruptions_change_pixels_and_grow_with_severity(domain: Domain) -> None:
    world = World(9)
    n = 24
    clean = [_pixels(world.sample(i)) for i in range(n)]
    change = []
    for severity in synthetic.SEVERITIES:
        shifted = [_pixels(world.sample(i, domain, severity)) for i in range(n)]
        change.append(float(np.mean([np.abs(a - b).mean() for a, b in zip(clean, shifted, strict=True)])))
    assert change[0] > 1.0, change  # mean absolute change in 0..255 pixel units
    assert all(b > a for a, b in itertools.pairwise(change)), change


def test_unseen_textures_change_pixels_and_grow_with_severity() -> None:
    world = World(9)
    n = 24
    clean = [_pixels(world.sample(i)) for i in range(n)]
    base = [_pixels(world.sample(i, Domain.UNSEEN_TEXTURES, 1)) for i in range(n)]
    assert np.mean([np.abs(a - b).mean() for a, b in zip(clean, base, strict=True)]) > 1.0
    change = []
    for severity in synthetic.SEVERITIES[1:]:
        shifted = [_pixels(world.sample(i, Domain.UNSEEN_TEXTURES, severity)) for i in range(n)]
        change.append(float(np.mean([np.abs(a - b).mean() for a, b in zip(base, shifted, strict=True)])))
    assert all(b > a for a, b in itertools.pairwise(change)), change


def test_prompts_use_the_world_vocabulary() -> None:
    vocab = set(synthetic.vocabulary())
    for task in synthetic.TASKS:
        names = synthetic.class_names(task)
        assert len(names) == len(set(names)) >= 3
        for template in synthetic.prompts(task):
            assert "{}" in template
            for name in names:
                assert set(template.format(name).split()) <= vocab


@pytest.mark.parametrize(
    ("domain", "severity", "match"),
    [
        ("fog", 1, "unknown domain 'fog'"),
        ("noise", 0, "severity of domain 'noise'"),
        ("noise", 6, "got 6"),
        ("clean", 2, "clean domain has severity 0"),
    ],
)
def test_bad_domain_or_severity(domain: str, severity: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        next(synthetic.generate(1, seed=0, domain=domain, severity=severity))


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task 'weight'"):
        synthetic.class_names("weight")
