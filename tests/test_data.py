"""Data: every source yields (3, H, W) tensors in [-1, 1], with clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from vaedyn_cli import data as dm
from vaedyn_cli.config import DataConfig
from vaedyn_cli.errors import VaedynError


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _check(ds: torch.utils.data.Dataset, n: int, res: int) -> torch.Tensor:
    assert len(ds) == n
    x = torch.stack([ds[i] for i in range(n)])
    assert x.shape == (n, 3, res, res) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    return x


def test_to_tensor_resizes_shorter_side_center_crops_and_scales() -> None:
    arr = np.zeros((20, 60, 3), np.uint8)  # 60 wide, 20 high: left third black, middle white, right third grey
    arr[:, 20:40] = 255
    arr[:, 40:] = 51
    t = dm.to_tensor(Image.fromarray(arr), 8)  # shorter side 20 -> 8, width 24, crop the middle 8 columns
    assert t.shape == (3, 8, 8)
    inner = t[:, :, 1:7]  # the white middle third, 255 -> +1 (the outer columns blend with the neighbours)
    assert torch.allclose(inner, torch.ones_like(inner))
    assert (t[:, :, 0] < 0.9).all() and (t[:, :, 7] < 0.9).all()
    black = dm.to_tensor(Image.new("L", (8, 8), 0), 8)
    assert black.shape == (3, 8, 8) and torch.all(black == -1.0)  # grey -> RGB, 0 -> -1
    ramp = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))
    flipped = dm.to_tensor(Image.fromarray(ramp), 8, flip=True)
    assert torch.equal(flipped, dm.to_tensor(Image.fromarray(ramp), 8).flip(-1))


# torchvision's Resize(res) + CenterCrop(res), worked out by hand: the longer side is
# int(res * long / short) (truncated), the crop offset int(round(excess / 2)) (half to even).
# (width, height, res, resized (w, h), crop box (left, top, right, bottom))
TORCHVISION_CASES = [
    (500, 375, 256, (341, 256), (42, 0, 298, 256)),  # 341.33; excess 85: round(42.5) = 42
    (333, 500, 256, (256, 384), (0, 64, 256, 320)),  # 384.38
    (427, 320, 128, (170, 128), (21, 0, 149, 128)),  # 170.8 -> 170 (rounding gives 171)
    (480, 640, 128, (128, 170), (0, 21, 128, 149)),  # 170.67 -> 170
    (1382, 1050, 256, (336, 256), (40, 0, 296, 256)),  # 336.94 -> 336
    (1000, 667, 256, (383, 256), (64, 0, 320, 256)),  # 383.81 -> 383; excess 127: round(63.5) = 64
    (640, 427, 256, (383, 256), (64, 0, 320, 256)),  # 383.70 -> 383
    (320, 463, 128, (128, 185), (0, 28, 128, 156)),  # 185.2; excess 57: round(28.5) = 28
    (99, 80, 64, (79, 64), (8, 0, 72, 64)),  # 79.2; excess 15: round(7.5) = 8 (floor gives 7)
    (67, 64, 64, (67, 64), (2, 0, 66, 64)),  # not resized; excess 3: round(1.5) = 2 (floor gives 1)
    (64, 71, 64, (64, 71), (0, 4, 64, 68)),  # excess 7: round(3.5) = 4
    (35, 32, 32, (35, 32), (2, 0, 34, 32)),
    (65, 64, 64, (65, 64), (0, 0, 64, 64)),  # excess 1: round(0.5) = 0
    (69, 64, 64, (69, 64), (2, 0, 66, 64)),  # excess 5: round(2.5) = 2
    (20, 30, 32, (32, 48), (0, 8, 32, 40)),  # upscaled: 48 exactly
    (21, 30, 32, (32, 45), (0, 6, 32, 38)),  # 45.71 -> 45; excess 13: round(6.5) = 6
    (30, 21, 32, (45, 32), (6, 0, 38, 32)),
    (299, 200, 8, (11, 8), (2, 0, 10, 8)),  # 11.96 -> 11; excess 3: 2
    (100, 100, 64, (64, 64), (0, 0, 64, 64)),
    (64, 64, 64, (64, 64), (0, 0, 64, 64)),
]


@pytest.mark.parametrize(("w", "h", "res", "size", "box"), TORCHVISION_CASES)
def test_resize_and_crop_geometry_is_torchvision(w: int, h: int, res: int, size: tuple, box: tuple) -> None:
    assert dm.resized_size(w, h, res) == size
    assert dm.center_crop_box(*size, res) == box


def _unit_scaled(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor + Normalize([0.5], [0.5]) written out: float32 x / 255, then (y - 0.5) / 0.5."""
    y = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return torch.from_numpy((y - np.float32(0.5)) / np.float32(0.5)).permute(2, 0, 1)


def _random_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":  # alpha varies, some pixels fully transparent
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        arr[..., 3] = np.where(arr[..., 3] < 64, 0, arr[..., 3])
        return Image.fromarray(arr, "RGBA")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "1", "CMYK"])
def test_to_tensor_is_resize_crop_then_rgb_pixel_for_pixel(mode: str) -> None:
    # the original's pipeline as PIL calls, with the hand-computed sizes and boxes of TORCHVISION_CASES:
    # resize (bilinear, in the image's mode) unless the size stays, crop, RGB, ToTensor, Normalize
    for i, (w, h, res, size, box) in enumerate(TORCHVISION_CASES[::3]):
        image = _random_image(w, h, mode, seed=i)
        resized = image.resize(size, Image.BILINEAR) if size != (w, h) else image
        expected = _unit_scaled(resized.crop(box).convert("RGB"))
        assert torch.equal(dm.to_tensor(image, res), expected), (mode, w, h, res)
    if mode in {"P", "RGBA", "1"}:  # the order matters for these modes: converting first would differ
        image = _random_image(427, 320, mode, seed=0)
        first = image.convert("RGB").resize((170, 128), Image.BILINEAR).crop((21, 0, 149, 128))
        assert not torch.equal(dm.to_tensor(image, 128), _unit_scaled(first))


def test_to_tensor_scaling_is_totensor_normalize_for_every_byte() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = (values.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    t = dm.to_tensor(Image.fromarray(values, "L"), 16)
    assert all(torch.equal(t[c], torch.from_numpy(expected)) for c in range(3))


@pytest.mark.parametrize("res", [16, 32, 64, 128])
def test_square_images_are_resized_straight_to_the_resolution(res: int) -> None:
    # a square image (every builtin tile is 64 x 64) is one bilinear resize to res x res, no crop
    image = _random_image(64, 64, "RGB", seed=res)
    expected = image if res == 64 else image.resize((res, res), Image.BILINEAR)
    assert torch.equal(dm.to_tensor(image, res), _unit_scaled(expected))


@pytest.mark.parametrize("name", ["builtin:natural", "builtin:glyphs"])
def test_builtin_sets_are_seeded_split_and_scaled(name: str) -> None:
    cfg = DataConfig(dataset_name=name, resolution=16, max_samples=12, validation_max_samples=5)
    train = _check(dm.train_dataset(cfg, seed=0), 12, 16)
    again = _check(dm.train_dataset(cfg, seed=0), 12, 16)
    other = _check(dm.train_dataset(cfg, seed=1), 12, 16)
    assert torch.equal(train, again) and not torch.equal(train, other)
    val = _check(dm.validation_dataset(cfg, seed=0), 5, 16)
    test = _check(dm.image_dataset(cfg, "test", max_samples=5, seed=0), 5, 16)
    assert not torch.equal(val, test)
    assert train.std() > 0.05  # images, not blanks


def test_builtin_natural_holds_out_whole_photos() -> None:
    splits = dm.NATURAL_PHOTOS
    assert not set(splits["train"]) & set(splits["validation"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["validation"]) & set(splits["test"])


def test_builtin_glyphs_are_dark_ink_on_white() -> None:
    x = _check(dm.train_dataset(DataConfig(dataset_name="builtin:glyphs", resolution=32, max_samples=8), 0), 8, 32)
    white = (x > 0.9).float().mean()
    ink = (x < -0.5).float().mean()
    assert white > 0.5 and ink > 0.02  # a low-entropy set: mostly paper, some ink


def test_local_image_folder_with_split_subfolders(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "imgs" / "train" / f"{i}.png", (255, 0, 0))
    _png(tmp_path / "imgs" / "test" / "a.jpg", (0, 0, 255))
    cfg = DataConfig(dataset_name=str(tmp_path / "imgs"), resolution=16)
    x = _check(dm.train_dataset(cfg, 0), 3, 16)
    assert torch.allclose(x[:, 0], torch.ones(3, 16, 16)) and torch.allclose(x[:, 1], -torch.ones(3, 16, 16))
    y = _check(dm.image_dataset(cfg, "test", max_samples=None, seed=0), 1, 16)
    assert y[0, 2].mean() > 0.9
    with pytest.raises(VaedynError, match="split 'validation' not found .* available splits: train, test"):
        dm.validation_dataset(cfg, 0)


def test_flat_image_folder_is_train_only(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.png", (0, 255, 0))
    cfg = DataConfig(dataset_name=str(tmp_path / "flat"), resolution=8, max_samples=2)
    _check(dm.train_dataset(cfg, 0), 2, 8)


def _hub_like_parquet(root: Path, column: str = "img") -> Path:
    """A local copy laid out like the hub's parquet export of uoft-cs/cifar10."""
    red = [_png(root / "src" / f"r{i}.png", (255, 0, 0), (32, 32)) for i in range(4)]
    blue = [_png(root / "src" / f"b{i}.png", (0, 0, 255), (32, 32)) for i in range(2)]
    feats = datasets.Features({column: datasets.Image(), "label": datasets.Value("int64")})
    out = root / "cifar10" / "plain_text"
    out.mkdir(parents=True)
    for split, files in (("train", red), ("test", blue)):
        ds = datasets.Dataset.from_dict({column: [str(f) for f in files], "label": [0] * len(files)}, features=feats)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    return root / "cifar10"


def test_parquet_in_hub_layout(tmp_path: Path) -> None:
    root = _hub_like_parquet(tmp_path)
    cfg = DataConfig(dataset_name=str(root), image_column="img", resolution=16, validation_split_name="test")
    x = _check(dm.train_dataset(cfg, 0), 4, 16)
    assert torch.allclose(x[:, 0], torch.ones_like(x[:, 0]))
    v = _check(dm.validation_dataset(cfg, 0), 2, 16)
    assert torch.allclose(v[:, 2], torch.ones_like(v[:, 2]))
    single = DataConfig(dataset_name=str(root / "plain_text" / "test-00000-of-00001.parquet"), image_column="img")
    with pytest.raises(VaedynError, match="column 'image' not found .* available columns: img, label"):
        dm.train_dataset(single.model_copy(update={"image_column": "image"}), 0)


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    files = [_png(tmp_path / "src" / f"{i}.png", (0, 0, 0)) for i in range(3)]
    feats = datasets.Features({"image": datasets.Image()})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": [str(f) for f in files]}, features=feats),
        validation=datasets.Dataset.from_dict({"image": [str(files[0])]}, features=feats),
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(dataset_name=str(tmp_path / "saved"), resolution=8)
    x = _check(dm.train_dataset(cfg, 0), 3, 8)
    assert torch.all(x == -1.0)
    _check(dm.validation_dataset(cfg, 0), 1, 8)
    with pytest.raises(VaedynError, match="split 'test' not found"):
        dm.image_dataset(cfg, "test", max_samples=None, seed=0)


def test_streaming_parquet(tmp_path: Path) -> None:
    root = _hub_like_parquet(tmp_path)
    cfg = DataConfig(dataset_name=str(root), image_column="img", resolution=8, streaming=True, max_samples=3)
    ds = dm.train_dataset(cfg, 0)
    items = list(ds)
    assert len(items) == 3 and all(t.shape == (3, 8, 8) for t in items)


def test_bad_data_inputs(tmp_path: Path) -> None:
    with pytest.raises(VaedynError, match="unknown builtin dataset 'builtin:nope'"):
        dm.train_dataset(DataConfig(dataset_name="builtin:nope"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaedynError, match="no images"):
        dm.train_dataset(DataConfig(dataset_name=str(tmp_path / "empty")), 0)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    ds = dm.train_dataset(DataConfig(dataset_name=str(bad)), 0)
    with pytest.raises(VaedynError, match="cannot read image 0 of dataset"):
        ds[0]
    with pytest.raises(VaedynError, match="does not exist"):
        dm.train_dataset(DataConfig(dataset_name="./missing/folder"), 0)
    feats = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": []}, features=feats).save_to_disk(str(tmp_path / "zero"))
    with pytest.raises(VaedynError, match="is empty or damaged"):
        dm.train_dataset(DataConfig(dataset_name=str(tmp_path / "zero")), 0)


def test_hub_dataset_offline_names_the_ways_out() -> None:
    with pytest.raises(VaedynError) as e:
        dm.train_dataset(DataConfig(dataset_name="uoft-cs/cifar10", image_column="img"), 0)
    assert "uoft-cs/cifar10" in str(e.value) and "builtin:natural" in str(e.value) and "\n" not in str(e.value)


def test_probe_batch_is_the_first_images() -> None:
    cfg = DataConfig(dataset_name="builtin:glyphs", resolution=16, validation_max_samples=50)
    batch = dm.probe_batch(cfg, "validation", 4, seed=0)
    ds = dm.validation_dataset(cfg, 0)
    assert batch.shape == (4, 3, 16, 16) and torch.equal(batch[2], ds[2])
