"""Build, load and save the VAE (diffusers `AutoencoderKL`).

Sources: the `sdxl` preset at any width (built from a seed, no network), a hub id, a local
diffusers folder, a single `.safetensors` file, and vaedyn's own checkpoints (a run folder,
its `final/`, or an accelerate `checkpoints/step-*` folder).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from vaedyn_cli import artifacts, inputs
from vaedyn_cli.config import ModelConfig, RunConfig, config_from_text
from vaedyn_cli.errors import VaedynError

log = logging.getLogger(__name__)

SDXL_BLOCK_OUT = (128, 256, 512, 512)
SDXL_GROUPS = 32
SDXL_SCALING_FACTOR = 0.13025
DEFAULT_HUB_ID = "stabilityai/sdxl-vae"


def sdxl_config(width: float = 1.0) -> dict[str, Any]:
    """The diffusers config of the SDXL VAE with channels and norm groups scaled by `width`."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [int(round(c * width)) for c in SDXL_BLOCK_OUT],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": int(round(SDXL_GROUPS * width)),
        "sample_size": 1024,
        "scaling_factor": SDXL_SCALING_FACTOR,
    }


def build_preset(width: float = 1.0, seed: int = 0) -> AutoencoderKL:
    """A freshly initialised SDXL-architecture VAE; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**sdxl_config(width))


def warn_fp16(mixed_precision: str) -> None:
    if mixed_precision == "fp16":
        warnings.warn(
            "the SDXL VAE overflows in fp16 (its activations exceed the fp16 range and turn into NaN; "
            "this is why the community published an fp16-fix VAE): use mixed_precision bf16 or no",
            stacklevel=2,
        )


def _looks_like_diffusers_folder(path: Path) -> bool:
    return (path / artifacts.MODEL_CONFIG_FILE).is_file()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _hub_error(source: str, err: Exception) -> VaedynError:
    why = "offline mode (HF_HUB_OFFLINE=1)" if _offline() else f"{type(err).__name__}"
    return VaedynError(
        f"cannot load model '{source}' from the Hugging Face hub ({why}): download it once with network "
        "access (it is then cached), set model.pretrained to a local diffusers folder or .safetensors file, "
        "or train from scratch with model.architecture: sdxl and no model.pretrained"
    )


def load_single_file(path: Path, width: float = 1.0) -> AutoencoderKL:
    """A single `.safetensors` file: diffusers-format keys load into the preset; original (LDM) keys go
    through diffusers `from_single_file` with the preset's config, so nothing is fetched from the hub."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise VaedynError(f"cannot read weights file {path}: {e}; pass a .safetensors VAE checkpoint") from None
    if any(k.startswith("encoder.down_blocks.") for k in state):
        model = AutoencoderKL(**_infer_sdxl_config(state))
        _load_state(model, state, str(path))
        return model
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _infer_sdxl_config_ldm(state)
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfg}))
        try:
            return AutoencoderKL.from_single_file(str(path), config=tmp, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise VaedynError(
                f"cannot convert single-file checkpoint {path}: {e}; pass a diffusers folder instead"
            ) from None


def _infer_sdxl_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    base = state["encoder.conv_in.weight"].shape[0]
    return sdxl_config(base / SDXL_BLOCK_OUT[0])


def _infer_sdxl_config_ldm(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    key = next((k for k in state if k.endswith("encoder.conv_in.weight")), None)
    if key is None:
        raise VaedynError("single-file checkpoint has no encoder.conv_in.weight: it is not a VAE")
    return sdxl_config(state[key].shape[0] / SDXL_BLOCK_OUT[0])


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise VaedynError(
            f"weights in {where} do not fit the architecture ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} of another shape, e.g. '{first}'); check model.width / model.pretrained"
        )
    model.load_state_dict(state)


def load_pretrained(source: str, subfolder: str | None = None, revision: str | None = None) -> AutoencoderKL:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise VaedynError(f"model file {path} is not a .safetensors file; convert it or pass a diffusers folder")
        return load_single_file(path)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not _looks_like_diffusers_folder(folder):
            raise VaedynError(
                f"{folder} has no {artifacts.MODEL_CONFIG_FILE}: not a diffusers model folder "
                "(expected config.json + diffusion_pytorch_model.safetensors, as written by save_pretrained)"
            )
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise VaedynError(
                f"model folder {folder} has {artifacts.MODEL_CONFIG_FILE} but no weights (*.safetensors); "
                "it was not written completely by save_pretrained"
            )
        try:
            return AutoencoderKL.from_pretrained(str(folder))
        except OSError as e:
            raise VaedynError(f"cannot load diffusers folder {folder}: {str(e).splitlines()[0]}") from None
        except ValueError as e:  # diffusers: a weight's shape differs from what config.json describes
            why = str(e).splitlines()[0].split(" If you want")[0].replace("Cannot load  because ", "") if str(e) else ""
            raise VaedynError(
                f"weights in {folder} do not fit its {artifacts.MODEL_CONFIG_FILE} ({why}); "
                "re-save the model with save_pretrained"
            ) from None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise VaedynError(f"model path {source} does not exist; pass an existing folder, file or hub id")
    try:
        with warnings.catch_warnings():
            # diffusers passes an argument huggingface_hub deprecated; nothing a user can act on
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
            return AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        raise _hub_error(source, e) from None


def build_model(cfg: ModelConfig, seed: int) -> AutoencoderKL:
    """The model a config asks for: pretrained weights, or the preset built from `seed`."""
    if cfg.pretrained:
        return load_pretrained(cfg.pretrained, cfg.subfolder, cfg.revision)
    return build_preset(cfg.width, seed)


def save_model(model: AutoencoderKL, folder: Path, cfg: RunConfig | None = None, step: int | None = None) -> Path:
    """A diffusers `save_pretrained` folder that also carries the run config and global step it came from."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    if cfg is not None:
        (folder / artifacts.RUN_CONFIG_IN_CHECKPOINT).write_text(cfg.to_yaml())
    if step is not None:
        (folder / artifacts.STEP_FILE).write_text(json.dumps({"step": int(step)}))
    return folder


# ---------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class Checkpoint:
    """Where a model comes from, what step it was saved at, and the config stored with it."""

    source: str
    kind: str  # "diffusers", "step", "hub", "file"
    path: Path | None
    step: int
    run_dir: Path | None
    config: RunConfig | None

    def load(self) -> AutoencoderKL:
        if self.kind == "step":
            assert self.path is not None
            from safetensors.torch import load_file

            try:
                model = AutoencoderKL.from_config(json.loads((self.path / artifacts.MODEL_CONFIG_FILE).read_text()))
                state = load_file(str(self.path / artifacts.ACCELERATE_MODEL_FILE))
            except Exception as e:  # noqa: BLE001 - json, diffusers and safetensors raise many types for a damaged file
                first = inputs.first_line(e)
                raise VaedynError(
                    f"cannot read checkpoint {self.path} ({type(e).__name__}: {first}): it is damaged; pick another "
                    "checkpoint"
                ) from None
            _load_state(model, state, str(self.path))
            return model
        if self.kind == "hub":
            return load_pretrained(self.source)
        assert self.path is not None
        return load_pretrained(str(self.path))


def _stored_config(folder: Path) -> RunConfig | None:
    for candidate in (folder / artifacts.RUN_CONFIG_IN_CHECKPOINT, folder / artifacts.CONFIG_FILE):
        if candidate.is_file():
            return config_from_text(inputs.read_text(candidate, "stored config"), str(candidate))
    return None


def resolve_checkpoint(source: str | Path) -> Checkpoint:
    """Accepts a diffusers folder, a `checkpoints/step-*` folder, a run folder (its `final/`), a
    `.safetensors` file, or a hub id; checks that the weights are there before anything loads."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return Checkpoint(text, "file", path, 0, None, None)
    if path.is_dir():
        step = artifacts.parse_step(path.name)
        if step is not None:
            needed = [artifacts.ACCELERATE_MODEL_FILE, artifacts.MODEL_CONFIG_FILE]
            missing = [n for n in needed if not (path / n).is_file()]
            if missing:
                raise VaedynError(
                    f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete or not written by "
                    "`vaedyn train` (which saves one every train.save_interval steps)"
                )
            run_dir = artifacts.run_of(path)
            cfg = _stored_config(path) or (_stored_config(run_dir) if run_dir else None)
            return Checkpoint(text, "step", path, step, run_dir, cfg)
        if (path / artifacts.CONFIG_FILE).is_file() and not _looks_like_diffusers_folder(path):
            final = path / artifacts.FINAL_DIR
            if not _looks_like_diffusers_folder(final):
                raise VaedynError(
                    f"run folder {path} has no {artifacts.FINAL_DIR}/ model yet: the run did not finish; pass one "
                    f"of its {artifacts.CHECKPOINTS_DIR}/step-* folders or resume it with `vaedyn train --resume latest`"
                )
            return _diffusers_checkpoint(text, final, run_dir=path)
        if _looks_like_diffusers_folder(path):
            weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
            if not weights:
                raise VaedynError(
                    f"checkpoint folder {path} has config.json but no weights (*.safetensors); "
                    "it was not written completely by save_pretrained"
                )
            return _diffusers_checkpoint(text, path, run_dir=artifacts.run_of(path))
        raise VaedynError(
            f"{path} is not a checkpoint: expected a diffusers folder (config.json + weights), a "
            "checkpoints/step-* folder, or a run folder written by `vaedyn train`"
        )
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise VaedynError(f"checkpoint {text} does not exist; pass an existing folder, file or a hub id")
    return Checkpoint(text, "hub", None, 0, None, None)


def _diffusers_checkpoint(source: str, folder: Path, run_dir: Path | None) -> Checkpoint:
    cfg = _stored_config(folder) or (_stored_config(run_dir) if run_dir else None)
    step = 0
    meta = folder / artifacts.STEP_FILE
    if meta.is_file():
        fix = "it should read {\"step\": N}; restore it or delete it (the model then counts as step 0)"
        record = inputs.read_json(meta, "step file", fix)
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise VaedynError(f"step file {meta} holds no step count ({inputs.shorten(json.dumps(record), 40)}); {fix}")
    return Checkpoint(source, "diffusers", folder, step, run_dir, cfg)
