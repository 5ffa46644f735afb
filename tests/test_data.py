"""paretoken.evaluators.data: Debian Fashion-MNIST, ImageNet-style folders, seeded disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from paretoken.errors import ParetokenError
from paretoken.evaluators.data import FASHION_MNIST_DIR, load_fashion_mnist, load_split
from paretoken.evaluators.models import build_default_architecture

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def default_model() -> torch.nn.Module:
    return build_default_architecture()


@pytest.fixture(scope="module")
def rgb_model() -> torch.nn.Module:
    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


@needs_fashion_mnist
def test_debian_fashion_mnist_loads() -> None:
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert train_y.shape == (60_000,) and test_y.shape == (10_000,)
    assert set(np.unique(train_y)) == set(range(10)) == set(np.unique(test_y))


@needs_fashion_mnist
def test_fashion_mnist_splits_are_seeded_and_disjoint(default_model) -> None:
    eval_x, eval_y = load_split(None, default_model, "eval", 64, seed=0)
    again_x, again_y = load_split("fashion-mnist", default_model, "eval", 64, seed=0)
    other_x, _ = load_split(None, default_model, "eval", 64, seed=1)
    calib_x, _ = load_split(str(FASHION_MNIST_DIR), default_model, "calib", 64, seed=0)
    assert eval_x.shape == (64, 1, 28, 28) and eval_x.dtype == torch.float32
    assert eval_y.shape == (64,) and eval_y.dtype == torch.int64
    assert torch.equal(eval_x, again_x) and torch.equal(eval_y, again_y)
    assert not torch.equal(eval_x, other_x)
    # normalised with the Fashion-MNIST mean/std: black pixels map to -mean/std
    assert eval_x.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    # evaluation images are test images, calibration images are train images, none shared
    eval_keys, calib_keys = _uint8_keys(eval_x), _uint8_keys(calib_x)
    assert eval_keys <= {row.tobytes() for row in load_fashion_mnist("test")[0]}
    assert calib_keys <= {row.tobytes() for row in load_fashion_mnist("train")[0]}
    assert len(eval_keys) == len(calib_keys) == 64 and not eval_keys & calib_keys


@needs_fashion_mnist
def test_skip_holds_out_the_first_images(default_model) -> None:
    """skip=k gives the images after the first k of the same seeded order: none of those k."""
    first_x, first_y = load_split(None, default_model, "eval", 48, seed=0)
    held_x, held_y = load_split(None, default_model, "eval", 32, seed=0, skip=16)
    assert torch.equal(held_x, first_x[16:]) and torch.equal(held_y, first_y[16:])
    assert not _uint8_keys(held_x) & _uint8_keys(first_x[:16])
    with pytest.raises(ParetokenError, match=r"images: 9995 is invalid; valid: an integer in 1..9990 .* after skipping 10\)"):
        load_split(None, default_model, "eval", 9995, skip=10)
    with pytest.raises(ParetokenError, match=r"skip: -1 is invalid; valid: an integer in 0..9999 \(10000 images available in"):
        load_split(None, default_model, "eval", 10, skip=-1)


def _uint8_keys(images: torch.Tensor) -> set[bytes]:
    """Undo the Fashion-MNIST normalisation of (N, 1, 28, 28) images; one bytes key per image."""
    pixels = (images[:, 0] * 0.3530 + 0.2860).mul(255).round().to(torch.uint8)
    return {row.numpy().tobytes() for row in pixels}


@needs_fashion_mnist
def test_fashion_mnist_for_a_224px_rgb_model(rgb_model) -> None:
    images, labels = load_split(None, rgb_model, "eval", 3)
    assert images.shape == (3, 3, 224, 224) and labels.shape == (3,)
    mean = torch.tensor(rgb_model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(rgb_model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = images * std + mean
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)


def _write_folder(root, classes=("bag", "coat", "shirt"), per_class=4) -> None:
    """Solid-colour PNGs of odd sizes: class k is pure red/green/blue channel k, brightness unique per image."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixel = [0, 0, 0]
            pixel[label] = 100 + 10 * i
            Image.new("RGB", (40 + i, 30), tuple(pixel)).save(root / name / f"img{i}.png")


def test_image_folder_labels_shapes_and_splits(tmp_path, rgb_model) -> None:
    _write_folder(tmp_path / "val")
    images, labels = load_split(str(tmp_path / "val"), rgb_model, "eval", 5, seed=0)
    assert images.shape == (5, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    std = torch.tensor(rgb_model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    mean = torch.tensor(rgb_model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    colour = (images * std + mean)[:, :, 112, 112]  # centre pixel in [0, 1]
    assert torch.equal(colour.argmax(dim=1), labels)

    again, _ = load_split(tmp_path / "val", rgb_model, "eval", 5, seed=0)
    calib, _ = load_split(tmp_path / "val", rgb_model, "calib", 7, seed=0)
    held, _ = load_split(tmp_path / "val", rgb_model, "eval", 3, seed=0, skip=2)
    assert torch.equal(images, again) and torch.equal(held, images[2:])
    eval_keys = {tuple(c.tolist()) for c in (images * std + mean)[:, :, 112, 112].mul(255).round()}
    calib_keys = {tuple(c.tolist()) for c in (calib * std + mean)[:, :, 112, 112].mul(255).round()}
    assert len(eval_keys) == 5 and len(calib_keys) == 7 and not eval_keys & calib_keys


def test_image_folder_for_the_grayscale_default_model(tmp_path, default_model) -> None:
    _write_folder(tmp_path / "val", per_class=1)
    images, labels = load_split(tmp_path / "val", default_model, "eval", None)
    assert images.shape == (3, 1, 28, 28) and sorted(labels.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("bad", ["missing", "empty"])
def test_bad_data_dir_is_one_line(tmp_path, default_model, bad) -> None:
    path = tmp_path / "nothing-here"
    if bad == "empty":
        path.mkdir()
    with pytest.raises(ParetokenError) as excinfo:
        load_split(str(path), default_model, "eval", 10)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and message.startswith("data:")


def test_missing_fashion_mnist_file_is_named(tmp_path) -> None:
    with pytest.raises(ParetokenError) as excinfo:
        load_fashion_mnist("test", tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message and "t10k-images-idx3-ubyte.gz" in message and "dataset-fashion-mnist" in message


def test_bad_split_and_n(default_model, tmp_path) -> None:
    with pytest.raises(ParetokenError, match="split: 'train'"):
        load_split(None, default_model, "train", 10)
    _write_folder(tmp_path / "val", per_class=1)
    with pytest.raises(ParetokenError, match="images: 4 is invalid; valid: an integer in 1..3"):
        load_split(tmp_path / "val", default_model, "eval", 4)


def test_a_folder_of_more_classes_than_the_model_predicts_is_refused(tmp_path, default_model) -> None:
    for k in range(11):
        (tmp_path / "val" / f"c{k:02d}").mkdir(parents=True)
        Image.new("L", (28, 28), 20 * k).save(tmp_path / "val" / f"c{k:02d}" / "0.png")
    with pytest.raises(ParetokenError, match="data: .* has 11 class folders but the model predicts 10 classes"):
        load_split(tmp_path / "val", default_model, "eval", None)


def test_unreadable_image_is_named(tmp_path, default_model) -> None:
    _write_folder(tmp_path / "val", per_class=1)
    broken = tmp_path / "val" / "bag" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ParetokenError) as excinfo:
        load_split(tmp_path / "val", default_model, "eval", None)
    assert "\n" not in str(excinfo.value) and str(broken) in str(excinfo.value)
