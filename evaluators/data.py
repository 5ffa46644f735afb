"""Evaluation and calibration images: Fashion-MNIST (Debian files) or an ImageNet-style folder.

`load_split` is the one entry point. It returns images already preprocessed for
the given model (float32, shape (n, C, H, W), normalised with the model's own
mean/std at the model's input size) and int64 labels of shape (n,).

Splits are deterministic for a given seed, and the calibration split never
overlaps the evaluation split:

* Fashion-MNIST: "eval" draws from the 10,000 test images, "calib" from the
  60,000 train images.
* ImageFolder: one seeded permutation of all images; "eval" takes the first n,
  "calib" the last n, so the two are disjoint while n_eval + n_calib <= images.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from paretoken.argtypes import MAX_SEED
from paretoken.errors import ParetokenError, check_int

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_IDX_MAGIC = {2049: 1, 2051: 3}  # magic number -> number of dimensions (uint8 data)
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (as root) or pass --data DIR"

Split = Literal["eval", "calib"]


def read_idx_gz(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes.

    Returns a uint8 array: (N, 28, 28) for an image file, (N,) for a label file.
    """
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise ParetokenError(f"data: cannot read {path} ({exc}); {_INSTALL_HINT}") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic not in _IDX_MAGIC:
        raise ParetokenError(
            f"data: {path} has magic number {magic}, expected 2049 (labels) or 2051 (images); "
            "pass an unmodified Fashion-MNIST idx.gz file"
        )
    ndim = _IDX_MAGIC[magic]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ParetokenError(
            f"data: {path} holds {len(raw) - offset} bytes of data, header says {expected} for shape {shape}; "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def is_fashion_mnist_dir(root: Path) -> bool:
    """True when `root` holds the four Fashion-MNIST idx.gz files."""
    return all((root / name).is_file() for pair in FASHION_MNIST_FILES.values() for name in pair)


def load_fashion_mnist(part: Literal["train", "test"], root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Load one Fashion-MNIST part: uint8 images (N, 28, 28) and int64 labels (N,) in 0..9."""
    root = Path(root)
    if not root.is_dir():
        raise ParetokenError(f"data: Fashion-MNIST directory {root} does not exist; {_INSTALL_HINT}")
    image_name, label_name = FASHION_MNIST_FILES[part]
    for name in (image_name, label_name):
        if not (root / name).is_file():
            raise ParetokenError(f"data: {root} has no {name}; {_INSTALL_HINT}")
    images = read_idx_gz(root / image_name)
    labels = read_idx_gz(root / label_name).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ParetokenError(
            f"data: {root} has {images.shape} images but {labels.shape} labels for part {part!r}; "
            "reinstall dataset-fashion-mnist"
        )
    return images, labels


def _model_data_config(model: torch.nn.Module) -> dict:
    """timm's data config (input_size, mean, std, interpolation, crop) for `model`."""
    from timm.data import resolve_data_config

    return resolve_data_config(model=model)


def fashion_mnist_to_model(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """Turn uint8 Fashion-MNIST images (N, 28, 28) into the model's input (N, C, H, W) float32.

    Pixels are scaled to [0, 1], resized (bilinear) to the model's input size when
    it is not 28x28, repeated to the model's channel count, and normalised with the
    model's pretrained_cfg mean/std.
    """
    cfg = _model_data_config(model)
    channels, height, width = cfg["input_size"]
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0).unsqueeze(1)
    if (height, width) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _seeded_indices(total: int, n: int | None, seed: int, source: str, from_end: bool = False,
                    skip: int = 0) -> np.ndarray:
    """n indices out of range(total): the first (or, from_end, the last) n of one seeded permutation,
    after passing over its first (last) ``skip``."""
    check_int("seed", seed, 0, MAX_SEED)
    check_int("skip", skip, 0, total - 1, note=f"{total} images available in {source}")
    n = total - skip if n is None else n
    check_int("images", n, 1, total - skip,
              note=f"{total - skip} images available in {source}" + (f" after skipping {skip}" if skip else ""))
    order = np.random.default_rng(seed).permutation(total)
    return (order[::-1] if from_end else order)[skip:skip + n]


def _load_fashion_mnist_split(root: Path, model: torch.nn.Module, split: Split, n: int | None, seed: int,
                              skip: int, load: int | None):
    part = "test" if split == "eval" else "train"
    images, labels = load_fashion_mnist(part, root)
    idx = _seeded_indices(len(images), n, seed, f"{root} ({part})", skip=skip)[:load]
    return fashion_mnist_to_model(images[idx], model), torch.from_numpy(labels[idx])


def _load_image_folder_split(root: Path, model: torch.nn.Module, split: Split, n: int | None, seed: int,
                             skip: int, load: int | None):
    from PIL import Image
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    cfg = _model_data_config(model)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"

    def loader(path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except OSError as exc:
            raise ParetokenError(f"data: cannot read image {path} ({exc}); remove or replace the file") from None

    try:
        dataset = ImageFolder(str(root), transform=create_transform(**cfg), loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ParetokenError(
            f"data: {root} is neither a Fashion-MNIST directory nor an image folder ({first_line}); "
            "pass a folder laid out as DIR/<class>/*.jpeg|png or the Fashion-MNIST idx.gz files"
        ) from None
    classes = getattr(model, "num_classes", 0)
    if classes and len(dataset.classes) > classes:
        raise ParetokenError(f"data: {root} has {len(dataset.classes)} class folders but the model predicts "
                             f"{classes} classes; valid: a folder of at most {classes} classes (sorted names map "
                             "to the model's class indices)")
    idx = _seeded_indices(len(dataset), n, seed, str(root), from_end=split == "calib", skip=skip)[:load]
    images = torch.stack([dataset[int(i)][0] for i in idx])
    labels = torch.tensor([dataset.targets[int(i)] for i in idx], dtype=torch.int64)
    return images, labels


def canonical_data(data: str | Path | None) -> str | None:
    """None for Debian's Fashion-MNIST however it is named (None, "fashion-mnist" or its directory),
    else ``data`` as a string: two settings that read the same images compare equal."""
    if data is None or str(data) == "fashion-mnist" or Path(data).resolve() == FASHION_MNIST_DIR.resolve():
        return None
    return str(data)


def load_split(
    data: str | Path | None,
    model: torch.nn.Module,
    split: Split,
    n: int | None,
    seed: int = 0,
    skip: int = 0,
    load: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load `n` preprocessed images of one split for `model`.

    data: None or "fashion-mnist" for Debian's Fashion-MNIST directory; otherwise a
        directory: Fashion-MNIST if it holds the four idx.gz files, else an
        ImageNet-style folder (DIR/<class>/<image>).
    split: "eval" or "calib" (disjoint from each other).
    n: number of images, None for the whole pool of that split.
    skip: images of the split's seeded order passed over first; ``skip=k`` returns images disjoint
        from those of ``n=k`` (held out from a search that measured on k images).
    load: read only the first ``load`` of the n images, once all n are known to exist (1: check a
        data source without reading it all).
    Returns (images float32 (n, C, H, W) normalised for the model, labels int64 (n,)).
    """
    if split not in ("eval", "calib"):
        raise ParetokenError(f"split: {split!r} is not valid; use 'eval' or 'calib'")
    if data is None or str(data) == "fashion-mnist":
        return _load_fashion_mnist_split(FASHION_MNIST_DIR, model, split, n, seed, skip, load)
    root = Path(data)
    if not root.is_dir():
        raise ParetokenError(
            f"data: {root} is not a directory; pass 'fashion-mnist', a Fashion-MNIST directory "
            "or an ImageNet-style folder DIR/<class>/<image>"
        )
    if is_fashion_mnist_dir(root):
        return _load_fashion_mnist_split(root, model, split, n, seed, skip, load)
    return _load_image_folder_split(root, model, split, n, seed, skip, load)
