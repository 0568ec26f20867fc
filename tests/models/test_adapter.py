"""The adapter reproduces each tower's embedding as `acts @ W.T (+ offset)` on real open_clip architectures.

ViT-B-32 (CLIP) and ViT-B-16-SigLIP are built offline with random weights and run in float64 on one image
and one random token sequence (never through the SigLIP tokenizer, which downloads).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import synthetic
from pipeline.models import registry
from pipeline.models.adapter import TINY_MODEL, ClipAdapter, TowerFeatures, load_model
from pipeline.models.pretrain import images_to_tensor, zero_shot_accuracy
from pipeline.models.tokenizer import WordTokenizer

# Zero-shot accuracy floors of the shipped tiny model on 300 clean images (chance: 1/6 shape, 1/8 colour;
# measured at training time: shape 0.89, colour 1.00 on 1,000 other images, see the model card).
TINY_SHAPE_FLOOR = 0.75
TINY_COLOUR_FLOOR = 0.9


def _build(name: str) -> ClipAdapter:
    adapter = load_model(name)
    adapter.model.double()
    return adapter


@pytest.fixture(scope="module")
def vit_b32() -> ClipAdapter:
    return _build("ViT-B-32")


@pytest.fixture(scope="module")
def siglip() -> ClipAdapter:
    return _build("ViT-B-16-SigLIP")


@pytest.fixture(scope="module")
def tiny() -> ClipAdapter:
    return load_model(TINY_MODEL)


def _check_reconstruction(
    adapter: ClipAdapter, vocab: int, context: int, atol: float, rtol: float
) -> tuple[TowerFeatures, TowerFeatures]:
    g = torch.Generator().manual_seed(0)
    size = adapter.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    pixels = torch.randn(1, 3, size, size, generator=g, dtype=adapter.dtype)  # [1, 3, H, W]
    tokens = torch.randint(0, vocab, (1, context), generator=g)  # [1, L]
    with torch.no_grad():
        image_ref = adapter.model.encode_image(pixels)  # [1, D]
        text_ref = adapter.model.encode_text(tokens)  # [1, D]
    image, text = adapter.image_features(pixels), adapter.text_features(tokens)
    torch.testing.assert_close(image.embed(adapter.image_weight()), image_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(text.embed(adapter.text_weight()), text_ref, atol=atol, rtol=rtol)
    assert image.acts.shape == (1, adapter.image_weight().shape[1])
    assert text.acts.shape == (1, adapter.text_weight().shape[1])
    return image, text


def test_vit_b32_reconstructs_both_towers(vit_b32: ClipAdapter) -> None:
    _check_reconstruction(vit_b32, vocab=49408, context=77, atol=1e-10, rtol=1e-10)


def test_vit_b32_weights_scale_and_likelihood(vit_b32: ClipAdapter) -> None:
    model = vit_b32.model
    assert vit_b32.image_weight().shape == (512, 768)  # [D, d]: visual.proj.T, no bias
    assert vit_b32.text_weight().shape == (512, 512)
    torch.testing.assert_close(vit_b32.image_weight(), model.visual.proj.detach().T, atol=0, rtol=0)
    torch.testing.assert_close(vit_b32.text_weight(), model.text_projection.detach().T, atol=0, rtol=0)
    assert vit_b32.likelihood == "infonce"
    assert vit_b32.scale == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-12)
    assert vit_b32.bias == 0.0
    # The Parameter projection is restored after the text tower ran without it.
    assert isinstance(model.text_projection, torch.nn.Parameter)
    assert "text_projection" in dict(model.named_parameters())


def test_vit_b32_identity(vit_b32: ClipAdapter) -> None:
    ident = vit_b32.identity()
    assert ident["name"] == "ViT-B-32"
    assert ident["pretrained"] is None and ident["weights_sha256"] is None
    assert (ident["embed_dim"], ident["image_width"], ident["text_width"]) == (512, 768, 512)


def test_siglip_reconstructs_both_towers_with_offset(siglip: ClipAdapter) -> None:
    image, text = _check_reconstruction(siglip, vocab=32000, context=64, atol=1e-10, rtol=1e-10)
    assert image.offset is not None and image.offset.shape == (1, 768)  # attention-pool residual
    torch.testing.assert_close(image.acts[:, -1], torch.ones(1, dtype=torch.float64), atol=0, rtol=0)
    assert text.offset is None  # text side: nn.Linear projection with bias -> trailing 1, no offset
    torch.testing.assert_close(text.acts[:, -1], torch.ones(1, dtype=torch.float64), atol=0, rtol=0)


def test_siglip_last_layer_is_attention_pool_fc2(siglip: ClipAdapter) -> None:
    pool = siglip.model.visual.trunk.attn_pool
    fc2 = pool.mlp.fc2
    w = siglip.image_weight()
    assert w.shape == (768, fc2.in_features + 1)  # [D, d + 1]: fc2 weight with its bias as last column
    torch.testing.assert_close(w[:, :-1], fc2.weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(w[:, -1], fc2.bias.detach(), atol=0, rtol=0)
    text_proj = siglip.model.text.text_projection
    assert siglip.text_weight().shape == (768, text_proj.in_features + 1)


def test_siglip_scale_bias_likelihood(siglip: ClipAdapter) -> None:
    assert siglip.likelihood == "siglip"
    assert siglip.scale == pytest.approx(float(siglip.model.logit_scale.detach().exp()), rel=1e-12)
    assert siglip.bias == pytest.approx(-10.0)  # the config's init_logit_bias
    assert siglip.identity()["image_bias"] == 1


def test_tiny_reconstructs_both_towers(tiny: ClipAdapter) -> None:
    cfg = registry.model_config(TINY_MODEL)["text_cfg"]
    _check_reconstruction(tiny, vocab=cfg["vocab_size"], context=cfg["context_length"], atol=1e-5, rtol=1e-5)
    assert tiny.likelihood == "infonce" and tiny.bias == 0.0
    assert tiny.image_weight().shape[0] == 64  # [D, d']
    assert tiny.text_weight().shape == (64, 128)


def test_tiny_text_path_and_preprocess(tiny: ClipAdapter) -> None:
    tokens = tiny.tokenize(["a red circle", "a photo of a star"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 12)
    feats = tiny.encode_texts(["a red circle", "a photo of a star", "a blue shape"])
    assert isinstance(feats, TowerFeatures) and feats.acts.shape == (3, 128) and feats.offset is None
    sample = synthetic.World(0).sample(0)
    pixels = tiny.preprocess(sample.image)
    assert pixels.shape == (3, 64, 64)
    # The preprocessing transform is the one the model was trained with.
    mean, std = registry.TINY_PREPROCESS["mean"], registry.TINY_PREPROCESS["std"]
    torch.testing.assert_close(pixels, images_to_tensor([sample.image], mean, std)[0], atol=1e-6, rtol=1e-6)


def test_tiny_zero_shot_accuracy_above_floor(tiny: ClipAdapter) -> None:
    samples = list(synthetic.generate(300, seed=31337))
    pixels = torch.stack([tiny.preprocess(s.image) for s in samples])  # [N, 3, 64, 64]
    labels = [s.labels for s in samples]
    shape = zero_shot_accuracy(tiny.model, tiny.tokenize, pixels, labels, "shape")
    colour = zero_shot_accuracy(tiny.model, tiny.tokenize, pixels, labels, "colour")
    assert shape > TINY_SHAPE_FLOOR, f"shape accuracy {shape:.3f}"
    assert colour > TINY_COLOUR_FLOOR, f"colour accuracy {colour:.3f}"


def test_tiny_identity_and_checkpoint_size(tiny: ClipAdapter) -> None:
    weights = registry.TINY_DIR / registry.WEIGHTS_FILE
    ident = tiny.identity()
    assert ident["name"] == TINY_MODEL
    assert ident["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ident["embed_dim"] == 64 and ident["text_width"] == 128
    assert ident["image_width"] == tiny.image_weight().shape[1]
    assert sum(p.stat().st_size for p in registry.TINY_DIR.iterdir()) < 10 * 2**20


@pytest.fixture(scope="module")
def tiny_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    for path in registry.TINY_DIR.iterdir():
        shutil.copy(path, out / path.name)
    return out


def _same_weights(a: ClipAdapter, b: ClipAdapter) -> None:
    torch.testing.assert_close(a.image_weight(), b.image_weight(), atol=0, rtol=0)
    torch.testing.assert_close(a.text_weight(), b.text_weight(), atol=0, rtol=0)
    state = dict(a.model.state_dict())
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0)


def test_load_local_dir(tiny: ClipAdapter, tiny_copy: Path) -> None:
    other = load_model(f"local-dir:{tiny_copy}")
    _same_weights(tiny, other)
    assert other.identity()["weights_sha256"] == tiny.identity()["weights_sha256"]
    torch.testing.assert_close(other.tokenize(["a red star"]), tiny.tokenize(["a red star"]))


def test_load_weights_file(tiny: ClipAdapter, tiny_copy: Path) -> None:
    weights = tiny_copy / registry.WEIGHTS_FILE
    by_file = load_model(str(weights))
    _same_weights(tiny, by_file)
    by_arch = load_model(TINY_MODEL, pretrained=str(weights))
    _same_weights(tiny, by_arch)
    assert by_arch.identity()["weights_sha256"] == tiny.identity()["weights_sha256"]
    stored = load_file(str(weights))
    state = by_file.model.state_dict()
    for key, value in stored.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0)


def test_missing_files_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match=r"open_clip_config\.json"):
        load_model(f"local-dir:{tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_model(str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_model("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_word_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = WordTokenizer(["a", "red", "circle"], context_length=5)
    ids = tok(["A red, circle!", "a blue circle a red"])
    end = tok.vocab_size - 1
    assert ids[0].tolist() == [tok.index["<start>"], 2, 3, 4, end]
    assert ids[1].tolist() == [tok.index["<start>"], 2, 1, 4, end]  # unknown word -> 1; truncated
    assert int(ids.argmax(dim=1)[0]) == 4  # the end token has the highest id (argmax pooling)
    tok.save(tmp_path)
    again = WordTokenizer.load(tmp_path)
    assert again.tokens == tok.tokens and again.context_length == 5
