"""Image sources, all through Hugging Face `datasets`, and their preparation.

Sources: a hub dataset id, a local image folder, parquet files, a `save_to_disk` folder, and two
embedded sets that need no network: `builtin:natural` (seeded crops of the photographs that
scikit-image ships, whole photos held out for validation and test) and `builtin:glyphs`
(characters rendered with the fonts matplotlib ships).

Preprocessing: torchvision's `Resize(resolution)` (bilinear, on the PIL image) and
`CenterCrop(resolution)` exactly, then RGB (as the original study's pipeline: the conversion comes
after the crop), optional random horizontal flip, scale to [-1, 1].
"""

from __future__ import annotations

import functools
import logging
import os
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vaedyn_cli.config import DataConfig
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("train", "validation", "test")
BUILTIN_SIZES = {"train": 2048, "validation": 128, "test": 128}
BUILTIN_TILE = 64  # builtin images are stored at this side and resized to the resolution
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Whole photographs held out per split, so validation and test measure generalisation.
NATURAL_PHOTOS = {
    "train": [
        "astronaut.png", "chelsea.png", "ihc.png", "hubble_deep_field.jpg", "retina.jpg",
        "motorcycle_left.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
        "gravel.png", "page.png", "text.png",
    ],
    "validation": ["rocket.jpg"],
    "test": ["coffee.png"],
}
GLYPH_CHARS = string.ascii_letters + string.digits + "&?@#%"
GLYPH_FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf",
    "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
]
_SPLIT_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


# ---------------------------------------------------------------------------------------------
# builtin sets


def _skimage_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def _mpl_font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=32)
def _photo(name: str) -> np.ndarray:
    with Image.open(_skimage_dir() / name) as im:
        return np.asarray(im.convert("RGB"))


def _natural_image(split: str, index: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split] + index])
    photos = NATURAL_PHOTOS[split]
    arr = _photo(photos[int(rng.integers(len(photos)))])
    h, w = arr.shape[:2]
    side = int(rng.integers(max(16, min(h, w) // 8), min(h, w) // 2 + 1))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(arr[top : top + side, left : left + side])
    return crop.resize((BUILTIN_TILE, BUILTIN_TILE), Image.BILINEAR)


@functools.lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_mpl_font_dir() / name), size)


def _glyph_image(split: str, index: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split] + index])
    char = GLYPH_CHARS[int(rng.integers(len(GLYPH_CHARS)))]
    font = _font(GLYPH_FONTS[int(rng.integers(len(GLYPH_FONTS)))], int(rng.integers(24, 52)))
    im = Image.new("RGB", (BUILTIN_TILE, BUILTIN_TILE), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    gw, gh = right - left, bottom - top
    x = int(rng.integers(0, max(1, BUILTIN_TILE - gw))) - left
    y = int(rng.integers(0, max(1, BUILTIN_TILE - gh))) - top
    draw.text((x, y), char, fill=(0, 0, 0), font=font)
    return im


_BUILTIN = {"natural": _natural_image, "glyphs": _glyph_image}


def builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + k for k in _BUILTIN]


@functools.lru_cache(maxsize=16)
def _builtin_dataset(kind: str, split: str, n: int, seed: int):  # noqa: ANN202 - datasets.Dataset
    import datasets

    make = _BUILTIN[kind]
    images = [make(split, i, seed) for i in range(n)]
    features = datasets.Features({"image": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images}, features=features)


def builtin_dataset(name: str, split: str, max_samples: int | None, seed: int):  # noqa: ANN201
    kind = name.removeprefix(BUILTIN_PREFIX)
    if kind not in _BUILTIN:
        raise VaedynError(f"unknown builtin dataset '{name}'; choose one of {', '.join(builtin_names())}")
    if split not in BUILTIN_SPLITS:
        raise VaedynError(f"split '{split}' not found in {name}; available splits: {', '.join(BUILTIN_SPLITS)}")
    n = BUILTIN_SIZES[split] if max_samples is None else min(max_samples, BUILTIN_SIZES[split])
    return _builtin_dataset(kind, split, n, seed)


# ---------------------------------------------------------------------------------------------
# local and hub sources


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet"))


def _split_of_file(p: Path, splits: list[str]) -> str | None:
    """`train-00000-of-00001.parquet` or `data/train/...` -> `train` (the hub's parquet layout)."""
    for part in [p.stem, *[q.name for q in p.parents]]:
        for s in splits:
            if part == s or part.startswith(s + "-") or part.startswith(s + "_"):
                return s
    return None


def _load_parquet(path: Path, split: str, streaming: bool):  # noqa: ANN202
    import datasets

    files = _parquet_files(path)
    if not files:
        raise VaedynError(f"no .parquet files under {path}")
    candidates = ["train", "validation", "valid", "test"]
    by_split: dict[str, list[str]] = {}
    if path.is_file():  # one file is the data, whatever its name: split 'train'
        by_split["train"] = [str(path)]
    for f in files if path.is_dir() else []:
        s = _split_of_file(f.relative_to(path), candidates) or "train"
        by_split.setdefault(s, []).append(str(f))
    if split not in by_split:
        raise VaedynError(f"split '{split}' not found in {path}; available splits: {', '.join(sorted(by_split))}")
    return datasets.load_dataset("parquet", data_files={split: by_split[split]}, split=split, streaming=streaming)


def _is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_from_disk(path: Path, split: str):  # noqa: ANN202
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets fails on empty or damaged folders with many types
        raise VaedynError(
            f"cannot load save_to_disk folder {path}: it is empty or damaged ({type(e).__name__}); "
            "re-create it with Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise VaedynError(f"split '{split}' not found in {path}; available splits: {', '.join(ds)}")
        return ds[split]
    if split != "train":
        raise VaedynError(f"split '{split}' not found in {path}: it holds one dataset, used as split 'train'")
    return ds


def _load_imagefolder(path: Path, split: str):  # noqa: ANN202
    import datasets

    subdirs = [d.name for d in path.iterdir() if d.is_dir()]
    split_dirs = [s for s in ("train", "validation", "test") if s in subdirs]
    if split_dirs:
        if split not in split_dirs:
            raise VaedynError(f"split '{split}' not found in {path}; available splits: {', '.join(split_dirs)}")
        files = [p for p in (path / split).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        if split != "train":
            raise VaedynError(
                f"split '{split}' not found in {path}: a folder without train/validation/test subfolders "
                "is split 'train' only"
            )
        files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    files.sort()
    if not files:
        raise VaedynError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
    features = datasets.Features({"image": datasets.Image()})
    return datasets.Dataset.from_dict({"image": [str(f) for f in files]}, features=features)


def _load_hub(name: str, config_name: str | None, split: str, streaming: bool):  # noqa: ANN202
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=streaming)
    except ValueError as e:
        if "split" in str(e).lower() or "Unknown split" in str(e):
            raise VaedynError(f"split '{split}' not found in dataset {name}: {str(e).splitlines()[0]}") from None
        raise VaedynError(f"cannot load dataset {name}: {str(e).splitlines()[0]}") from None
    except (ConnectionError, OSError, FileNotFoundError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in {"", "0"}
        why = "offline mode (HF_HUB_OFFLINE=1)" if offline else type(e).__name__
        raise VaedynError(
            f"cannot load dataset '{name}' from the Hugging Face hub ({why}): download it once with network "
            "access, point data.dataset_name at a local copy (image folder, parquet or save_to_disk folder), "
            "or use builtin:natural / builtin:glyphs"
        ) from None


def open_split(cfg: DataConfig, split: str, max_samples: int | None, seed: int):  # noqa: ANN201
    """The raw `datasets` split (Dataset or IterableDataset) a config names, capped at max_samples."""
    name = cfg.dataset_name
    if name.startswith(BUILTIN_PREFIX):
        return builtin_dataset(name, split, max_samples, seed)
    path = Path(name).expanduser()
    if path.exists():
        if path.suffix == ".parquet" or (path.is_dir() and not _is_saved_to_disk(path) and _parquet_files(path)):
            ds = _load_parquet(path, split, cfg.streaming)
        elif path.is_dir() and _is_saved_to_disk(path):
            ds = _load_from_disk(path, split)
        elif path.is_dir():
            ds = _load_imagefolder(path, split)
        else:
            raise VaedynError(f"data source {path} is a file but not .parquet; pass a folder or a parquet file")
    elif name.startswith((".", "/", "~")):
        raise VaedynError(f"data source {name} does not exist; pass an existing folder or a hub dataset id")
    else:
        ds = _load_hub(name, cfg.dataset_config_name, split, cfg.streaming)
    return _cap(ds, max_samples, name)


def _cap(ds, max_samples: int | None, name: str):  # noqa: ANN001, ANN202
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return ds.take(max_samples) if max_samples else ds
    if len(ds) == 0:
        raise VaedynError(f"dataset {name} is empty; check the path, split and max_samples")
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    return ds


# ---------------------------------------------------------------------------------------------
# preprocessing


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) of torchvision's `Resize(resolution)`: the shorter side becomes
    `resolution`, the longer int(resolution * long / short), truncated (not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if width <= height else (new_long, resolution)


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of torchvision's `CenterCrop(resolution)` on an image at least
    that large: offsets int(round(excess / 2)), Python's round (half to even: an excess of 3 starts at 2)."""
    left, top = int(round((width - resolution) / 2.0)), int(round((height - resolution) / 2.0))
    return left, top, left + resolution, top + resolution


def to_tensor(image: Image.Image, resolution: int, flip: bool = False) -> torch.Tensor:
    """torchvision's Resize(resolution) + CenterCrop(resolution) on the PIL image, then RGB, optional
    flip, [-1, 1], (3, H, W).

    The resize and crop happen in the image's own mode, as in the original study's pipeline, so Pillow
    resizes palette and bilevel images ("P", "1") by nearest neighbour and images with alpha in
    premultiplied alpha (fully transparent pixels come out black once alpha is dropped); RGB and
    grayscale images do not depend on the order. A size that does not change is not resampled.
    """
    size = resized_size(*image.size, resolution)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    image = image.crop(center_crop_box(*size, resolution))
    if image.mode != "RGB":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return t / 127.5 - 1.0


class ImageDataset(torch.utils.data.Dataset):
    """A map-style split as (3, H, W) tensors in [-1, 1]; flips are seeded per (epoch, index)."""

    def __init__(self, ds: Any, column: str, resolution: int, name: str, flip: bool = False, seed: int = 0):
        if column not in ds.column_names:
            raise VaedynError(
                f"column '{column}' not found in dataset {name}; available columns: {', '.join(ds.column_names)} "
                "(set data.image_column)"
            )
        self.ds, self.column, self.resolution, self.name = ds, column, resolution, name
        self.flip, self.seed, self.epoch = flip, seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            image = self.ds[int(index)][self.column]
        except Exception as e:  # noqa: BLE001 - PIL and datasets raise many types for a bad file
            raise VaedynError(f"cannot read image {index} of dataset {self.name}: {str(e).splitlines()[0]}") from None
        if not isinstance(image, Image.Image):
            raise VaedynError(
                f"column '{self.column}' of dataset {self.name} holds {type(image).__name__}, not images; "
                "set data.image_column to the image column"
            )
        flip = False
        if self.flip:
            flip = bool(np.random.default_rng([self.seed, self.epoch, int(index)]).integers(2))
        return to_tensor(image, self.resolution, flip)


class IterableImageDataset(torch.utils.data.IterableDataset):
    """A streamed split as (3, H, W) tensors in [-1, 1]."""

    def __init__(self, ds: Any, column: str, resolution: int, name: str):
        self.ds, self.column, self.resolution, self.name = ds, column, resolution, name

    def __iter__(self):  # noqa: ANN204
        for row in self.ds:
            if self.column not in row:
                raise VaedynError(
                    f"column '{self.column}' not found in dataset {self.name}; available columns: "
                    f"{', '.join(row)} (set data.image_column)"
                )
            yield to_tensor(row[self.column], self.resolution)


def image_dataset(
    cfg: DataConfig, split: str, *, max_samples: int | None, seed: int, train: bool = False
) -> torch.utils.data.Dataset:
    """A split of the configured source as tensors; checks the column before any work starts."""
    import datasets

    ds = open_split(cfg, split, max_samples, seed)
    name = cfg.dataset_name
    if isinstance(ds, datasets.IterableDataset):
        return IterableImageDataset(ds, cfg.image_column, cfg.resolution, name)
    return ImageDataset(ds, cfg.image_column, cfg.resolution, name, flip=train and cfg.random_flip, seed=seed)


def train_dataset(cfg: DataConfig, seed: int) -> torch.utils.data.Dataset:
    return image_dataset(cfg, cfg.train_split_name, max_samples=cfg.max_samples, seed=seed, train=True)


def validation_dataset(cfg: DataConfig, seed: int) -> torch.utils.data.Dataset:
    return image_dataset(cfg, cfg.validation_split_name, max_samples=cfg.validation_max_samples, seed=seed)


def probe_batch(cfg: DataConfig, split: str, n: int, seed: int) -> torch.Tensor:
    """The first n images of a split stacked into one (n, 3, H, W) batch: a fixed probe set."""
    ds = image_dataset(cfg, split, max_samples=n, seed=seed)
    items = [ds[i] for i in range(len(ds))] if hasattr(ds, "__len__") else list(ds)
    return torch.stack(items)
