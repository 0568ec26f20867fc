"""Decode: each kind of bad input lands in the quarantine with its reason; good images are preprocessed."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from pipeline.data.decode import Limits, decode_batch, split_preprocess
from pipeline.data.quarantine import Reason
from pipeline.flows.world import huge_png


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_reasons() -> None:
    good = _png(Image.new("RGB", (16, 16), (255, 0, 0)))
    images = [
        good,
        good[: len(good) // 2],
        b"",
        huge_png(),
        _png(Image.fromarray(np.zeros((16, 16), dtype=np.uint16))),
        good,
        None,
        _png(Image.new("RGB", (400, 4))),
    ]
    captions = ["a", "b", "c", "d", "e", None, "g", "h"]
    read_errors = [None, None, None, None, None, None, "FileNotFoundError: x", None]
    out = decode_batch(
        images,
        T.ToTensor(),
        (3, 16, 16),
        captions=captions,
        read_errors=read_errors,
        limits=Limits(max_aspect=50),
    )
    assert out.reason == [
        "",
        Reason.UNDECODABLE.value,
        Reason.EMPTY.value,
        Reason.ABSURD_SIZE.value,
        Reason.WRONG_MODE.value,
        Reason.MISSING_CAPTION.value,
        Reason.UNREADABLE.value,
        Reason.ABSURD_SIZE.value,
    ]
    assert out.ok.tolist() == [True] + [False] * 7
    np.testing.assert_allclose(out.pixels[0, 0], 1.0, rtol=0, atol=1e-7)  # red channel of a red image
    np.testing.assert_allclose(out.pixels[1:], 0.0, rtol=0, atol=0)


def test_modes_are_converted_to_rgb() -> None:
    images = [_png(Image.new(mode, (8, 8))) for mode in ("L", "RGBA", "P")]
    out = decode_batch(images, T.ToTensor(), (3, 8, 8))
    assert out.ok.all()


def _images() -> list[Image.Image]:
    """RGB images of awkward sizes: wide, tall, odd, smaller than the crop, exactly the crop, square."""
    rng = np.random.default_rng(0)
    sizes = [(97, 41), (41, 97), (224, 224), (300, 225), (13, 7), (63, 64), (64, 64), (500, 80), (3, 400)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _transforms() -> dict[str, object]:
    import open_clip

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return {
        "tiny/clip shortest": open_clip.image_transform(64, is_train=False),
        "vit-b-32": open_clip.image_transform(224, is_train=False),
        "siglip squash": open_clip.image_transform(224, is_train=False, resize_mode="squash"),
        "open_clip longest (fallback steps)": open_clip.image_transform(
            32, is_train=False, resize_mode="longest"
        ),
        "bilinear + max_size": T.Compose(
            [
                T.Resize(30, interpolation=T.InterpolationMode.BILINEAR, max_size=48),
                T.CenterCrop(30),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        ),
        "crop larger than resize": T.Compose(
            [T.Resize((20, 28)), T.CenterCrop((24, 31)), T.ToTensor(), T.Normalize(mean, std)]
        ),
        "nearest, no normalize": T.Compose(
            [T.Resize(17, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(17), T.ToTensor()]
        ),
    }


def test_split_preprocess_is_bit_identical_to_the_transform() -> None:
    """uint8 PIL part (torch-free steps) + batched finish == the torchvision/open_clip transform, exactly."""
    import torch

    for name, transform in _transforms().items():
        split = split_preprocess(transform)  # type: ignore[arg-type]
        assert split is not None, name
        assert split.pil.torch_free == ("fallback" not in name), name
        for image in _images():
            try:
                expected = transform(image)  # type: ignore[operator]  # [3, H, W] float32
            except ValueError as exc:  # e.g. a side resized to 0 pixels: the split refuses it the same way
                with pytest.raises(ValueError, match=str(exc)):
                    split.pil(image)
                continue
            got = split.finish(np.array(split.pil(image))[None])[0]
            assert got.dtype == torch.float32 and got.shape == expected.shape, name
            assert torch.equal(got, expected), (name, image.size, (got - expected).abs().max())


def test_decode_workers_do_not_import_torch(tmp_path: Path) -> None:
    """A pickled DecodeStage for the shipped model decodes in a fresh process without importing torch."""
    from pipeline.models.adapter import load_model
    from pipeline.runtime import pixel_shape
    from pipeline.stages.decode import DecodeStage

    adapter = load_model("bayescurate-tiny", None)
    stage = DecodeStage(adapter.preprocess, pixel_shape(adapter.preprocess))
    blob = tmp_path / "stage.pkl"
    blob.write_bytes(pickle.dumps(stage))
    image = _png(_images()[0])
    code = (
        "import pickle, sys, numpy as np\n"
        f"stage = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        f"out = stage({{'image': np.array([{image!r}, b'junk'], dtype=object)}})\n"
        "assert out['ok'].tolist() == [True, False], out\n"
        "assert out['pixels'].dtype == np.uint8, out['pixels'].dtype\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    # ...and the pixels are the ones the full transform gives, once finished on the model side.
    split = split_preprocess(adapter.preprocess)
    assert split is not None
    decoded = stage({"image": np.array([image], dtype=object)})
    expected = adapter.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))
    assert (split.finish(decoded["pixels"])[0] == expected).all()
