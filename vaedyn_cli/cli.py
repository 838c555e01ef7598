"""The `vaedyn` command line: one thin function per command (parse, load config, call a stage).

stdout carries data (a path, JSON) so that stages pipe; stderr carries logs and progress.
Bad input: one line on stderr, exit code 2, no traceback unless `--debug`.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from vaedyn_cli import __version__, errors, inputs
from vaedyn_cli import config as config_mod
from vaedyn_cli.errors import VaedynError

F = TypeVar("F", bound=Callable[..., Any])

PIPELINE = ("config", "train", "track", "classify", "nudge", "eval", "report", "study", "store")  # `--help`'s order


def _flags_as_flags(cmd: Any, ctx: Any) -> None:
    """Show boolean flags in --help as `--debug`, not `--debug <bool>` (Typer's rich help gives every
    option a type column); for a group, its commands too."""
    for param in [*cmd.params, cmd.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(cmd, "commands", {}).values():
        _flags_as_flags(sub, ctx)


class _Commands(typer.core.TyperGroup):
    """The vaedyn command group: commands listed in pipeline order, flags shown as flags."""

    def list_commands(self, ctx: Any) -> list[str]:
        rank = {name: i for i, name in enumerate(PIPELINE)}
        return sorted(super().list_commands(ctx), key=lambda name: rank.get(name, len(rank)))

    def get_command(self, ctx: Any, name: str) -> Any:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            _flags_as_flags(cmd, ctx)
        return cmd

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_as_flags(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(
    name="vaedyn",
    help="Track, classify and revive inactive channels of the SDXL VAE while it trains.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_Commands,
)
config_app = typer.Typer(help="Show, validate and describe configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

_state = {"debug": False}

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="FIELD=VALUE", help="Override a config field: --set train.learning_rate=1e-4 (repeatable)."),
]


def err(message: str) -> None:
    """Write a log line to stderr (stdout is for data)."""
    print(message, file=sys.stderr, flush=True)


def out(message: str) -> None:
    """Write data to stdout."""
    print(message, flush=True)


def print_path(path: str | Path) -> None:
    """Write a path to stdout, absolute: one style for every command, whatever form the input had."""
    out(os.path.abspath(path))


def handle_errors(fn: F) -> F:
    """Turn VaedynError into one stderr line and its exit code; anything else into exit 1; Ctrl-C
    and SIGTERM (and whatever a library raises while being interrupted) into "interrupted; ..."."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = errors.catch_signals()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the last line of defence: one line
            if _state["debug"]:
                raise
            if isinstance(e, KeyboardInterrupt) or errors.interrupted():
                line, code = errors.interrupt_line(e if isinstance(e, KeyboardInterrupt) else None)
            elif isinstance(e, VaedynError):
                line, code = f"error: {e}", e.exit_code
            elif isinstance(e, Exception):
                line, code = f"error: {type(e).__name__}: {inputs.first_line(e)} (rerun with --debug for the traceback)", 1
            else:
                raise
            err(line)
            raise typer.Exit(code) from None
        finally:
            errors.restore_signals(previous)

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        out(__version__)
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "matplotlib", "fsspec", "asyncio", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)


# ---------------------------------------------------------------------------------------------
# config


@config_app.command("show")
@handle_errors
def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    comments: Annotated[bool, typer.Option(help="Add each field's description as a comment.")] = False,
) -> None:
    """Print the resolved config (defaults, file, then --set overrides) as YAML."""
    cfg = config_mod.load_config(config, set_ or [])
    sys.stdout.write(config_mod.commented_yaml(cfg) if comments else cfg.to_yaml())


@config_app.command("validate")
@handle_errors
def config_validate(files: Annotated[list[Path], typer.Argument(help="Config files to check.")]) -> None:
    """Check config files; prints each valid path, exits 2 on the first invalid one."""
    for f in files:
        config_mod.load_config(f)
        print_path(f)


@config_app.command("schema")
@handle_errors
def config_schema(
    out_path: Annotated[
        Path, typer.Option("--out", help="Where to write the JSON Schema.")
    ] = config_mod.SCHEMA_PATH,
    stdout: Annotated[bool, typer.Option("--stdout", help="Print the schema instead of writing it.")] = False,
) -> None:
    """Write the JSON Schema of the config (checked in as schemas/vaedyn.schema.json)."""
    if stdout:
        sys.stdout.write(config_mod.schema_text())
        return
    print_path(config_mod.write_schema(out_path))


# ---------------------------------------------------------------------------------------------
# nudge


@app.command("nudge")
@handle_errors
def nudge_cmd(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="Diffusers folder, checkpoints/step-* folder, run folder or hub id.")
    ],
    targets: Annotated[
        str, typer.Option("--targets", help="`vaedyn classify --format json` output: a file, or - for stdin.")
    ],
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="gn_scale_nudge, gn_scale_reset, gn_scale_to_layer, redo or shrink_perturb "
            "(default: nudge.strategy of the config).",
        ),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option(
            "--select",
            help="Target filter FIELD=VALUE, repeatable, all must match: mechanism=gn_scale, trajectory=died, "
            "state=dormant,dead (either), layer=decoder.* (glob), unused=true, mechanism!=other "
            "(default: nudge.select).",
        ),
    ] = None,
    factor: Annotated[float | None, typer.Option("--factor", help="gn_scale_nudge: gamma multiplier.")] = None,
    max_scale: Annotated[float | None, typer.Option("--max-scale", help="gn_scale_nudge: cap on gamma.")] = None,
    shrink: Annotated[
        float | None, typer.Option("--shrink", help="shrink_perturb: lambda multiplying the parameters (0 to 1).")
    ] = None,
    perturb_std: Annotated[
        float | None, typer.Option("--perturb-std", help="shrink_perturb: sigma of the added Gaussian noise.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seed of the random strategies (redo, shrink_perturb; default: the run's seed)."),
    ] = None,
    max_fraction: Annotated[
        float | None, typer.Option("--max-fraction", help="Nudge at most this fraction of each layer, lowest score first.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="New checkpoint folder (default: <run>/nudged-<strategy> or <ckpt>-nudged-<strategy>)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML config (default: the config stored with the checkpoint)."),
    ] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing nudged folder.")] = False,
) -> None:
    """Nudge inactive channels of a checkpoint; writes a diffusers folder with nudge.json, prints its path."""
    from vaedyn_cli import nudge

    options = {
        "strategy": strategy, "select": select or None, "factor": factor, "max_scale": max_scale,
        "max_fraction": max_fraction, "shrink": shrink, "perturb_std": perturb_std,
    }
    path = nudge.nudge_checkpoint(
        checkpoint, targets, out=out_dir, config_path=config, overrides=set_ or [], nudge_options=options,
        overwrite=overwrite, seed=seed,
    )
    print_path(path)


# ---------------------------------------------------------------------------------------------
# train and eval


@app.command("train")
@handle_errors
def train_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Continue from `latest` (the run's newest checkpoint) or a checkpoints/step-* folder."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run folder and start over.")] = False,
) -> None:
    """Train (or fine-tune) the VAE into <output_dir>/<run_name>/; prints the run folder."""
    command = shlex.join(["vaedyn", "train", *(["-c", str(config)] if config else []),
                          *(a for s in set_ or [] for a in ("--set", s))])
    cfg = None
    try:
        from vaedyn_cli import train

        cfg = config_mod.load_config(config, set_ or [])
        run_dir = train.train(cfg, resume=resume, overwrite=overwrite)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or errors.interrupted():
            how = train.interrupt_hint(cfg, command) if cfg is not None else f"nothing was written: start again with: {command}"
            raise (errors.Terminated if isinstance(e, errors.Terminated) else KeyboardInterrupt)(how) from None
        raise
    if train.is_main_process():  # under `accelerate launch` every process returns here; print once
        print_path(run_dir)


@app.command("eval")
@handle_errors
def eval_cmd(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="With --compare: metrics.json files or eval folders.", show_default=False)
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="Diffusers folder, checkpoints/step-* folder, run folder (its final/) or hub id."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (default: the config stored with the checkpoint).")
    ] = None,
    set_: SetOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Split to evaluate (default: eval.split).")] = None,
    num_samples_to_save: Annotated[
        int | None, typer.Option("--num-samples-to-save", help="Original/reconstruction pairs saved as PNG.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Evaluation batch size.")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Evaluate at most this many images.")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Results folder (default: <run>/eval/<split>).")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Compare finished evaluations (PATHS) in the original study's Table 1 layout.")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="--compare output: table or json.")] = "table",
    ablate: Annotated[
        list[str] | None,
        typer.Option(
            "--ablate",
            help="Mean-ablate the channels matching FIELD=VALUE (repeatable, all must match; syntax of "
            "`vaedyn nudge --select`, e.g. state=dormant,dead) and, as a control, as many random active ones.",
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option("--store", help="--ablate/--grids: trace store or run folder with the labels (default: the "
                     "checkpoint's run)."),
    ] = None,
    grids: Annotated[
        list[str] | None,
        typer.Option(
            "--grids",
            help="Activation grid and linear lens of this layer (a module path: any module with feature maps, "
            "e.g. a GroupNorm or a conv_shortcut; or a glob over track.module_types; repeatable): "
            "grid-LAYER.png, lens-LAYER.png and a `grids` section in metrics.json.",
        ),
    ] = None,
) -> None:
    """Evaluate a checkpoint (MSE, KL, PSNR, SSIM); prints the metrics.json path. With --compare, a table."""
    from vaedyn_cli import evaluate
    from vaedyn_cli.compare import compare as compare_runs

    if compare:
        out(compare_runs(list(paths or []), fmt))
        return
    if paths:
        raise VaedynError(f"unexpected argument {paths[0]}: PATHS are for --compare; pass the model with --checkpoint")
    if checkpoint is None:
        raise VaedynError("missing --checkpoint: pass a run folder, a checkpoints/step-* folder or a diffusers folder")
    cfg = config_mod.load_config(config, set_ or []) if config is not None else None
    path = evaluate.evaluate(
        checkpoint, cfg, split=split, batch_size=batch_size, max_samples=max_samples,
        num_samples_to_save=num_samples_to_save, out=out_dir, overrides=None if config is not None else set_,
        ablate=ablate or None, store=store, grids=grids or None,
    )
    print_path(path)


# ---------------------------------------------------------------------------------------------
# classify


@app.command("classify")
@handle_errors
def classify_cmd(
    store: Annotated[
        str, typer.Argument(help="Trace store, run folder (its trace.zarr), or - to read the path from stdin.")
    ],
    method: Annotated[
        str | None, typer.Option("--method", help="dormancy, mean_abs_threshold, redo, grama, grama_filter or cbp "
                                 "(default: the store's config; see `vaedyn config show --comments`).")
    ] = None,
    tau: Annotated[float | None, typer.Option("--tau", help="dormancy: dormant when score <= tau.")] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="mean_abs_threshold: inactive when mean_abs < threshold.")
    ] = None,
    min_persist: Annotated[
        int | None, typer.Option("--min-persist", help="Tracked steps a change must hold to count.")
    ] = None,
    from_step: Annotated[int | None, typer.Option("--from-step", help="First step of the window.")] = None,
    to_step: Annotated[int | None, typer.Option("--to-step", help="Last step of the window (inclusive).")] = None,
    layers: Annotated[
        list[str] | None, typer.Option("--layers", help="Glob on layer names, repeatable (default: all layers).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override another classify field: --set classify.gn_scale_ratio=0.05 (repeatable)."),
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="table, json or csv (default: table on a terminal, else json).")
    ] = None,
    write: Annotated[
        bool, typer.Option("--write/--no-write", help="Write the store's classification group.")
    ] = True,
) -> None:
    """Label inactive channels of a trace (state, trajectory, mechanism, flags); writes its classification group."""
    from vaedyn_cli import classify

    options = {"method": method, "tau": tau, "threshold": threshold, "min_persist": min_persist}
    sys.stdout.write(classify.run(
        store, options, sets=set_ or [], from_step=from_step, to_step=to_step, layers=layers, write=write,
        fmt=fmt, tty=sys.stdout.isatty(),
    ))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# report


@app.command("report")
@handle_errors
def report_cmd(
    store: Annotated[
        str, typer.Argument(help="Trace store, run folder (its trace.zarr), or - to read the path from stdin.")
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Report folder (default: <run>/report/, or <store>.report/ beside a bare store)."),
    ] = None,
) -> None:
    """Draw the channel dynamics of a trace (PNG figures) and an index.html that opens from disk; prints the folder."""
    from vaedyn_cli import report

    print_path(report.build_report(store, out_dir))


# ---------------------------------------------------------------------------------------------
# study


@app.command("study")
@handle_errors
def study_cmd(
    study_file: Annotated[Path, typer.Argument(help="Study file (YAML): base config, conditions, seeds, reference.")],
    executor: Annotated[
        str,
        typer.Option("--executor", help="local (this machine), slurm (one submitit job per run: pip install "
                     "vaedyn\\[slurm]) or submitit-local (submitit's local executor, to try the submission path)."),
    ] = "local",
    jobs: Annotated[
        int, typer.Option("--jobs", help="--executor local: runs at a time (N > 1: subprocesses, cores // N threads each).")
    ] = 1,
    print_commands: Annotated[
        bool, typer.Option("--print-commands", help="Print one shell line per pending run instead of running them.")
    ] = False,
) -> None:
    """Run every (condition, seed) of a study, evaluate and classify each, write study.json and a report; prints
    the report folder."""
    from vaedyn_cli import study

    text = study.run_study(study_file, executor=executor, jobs=jobs, print_commands=print_commands)
    if not print_commands:
        print_path(text)
        return
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# track and store


@app.command("track")
@handle_errors
def track_cmd(
    checkpoints: Annotated[
        list[str] | None,
        typer.Argument(metavar="CHECKPOINT", help="Checkpoints to trace, as --checkpoint takes them "
                       "(`--checkpoint A B C` traces all three).", show_default=False),
    ] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint",
            help="Run folder (its final/), checkpoints/step-* folder, a run's checkpoints/ folder (all of its steps), "
            "diffusers folder or hub id; repeatable.",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config (default: the config stored with the checkpoints).")
    ] = None,
    set_: SetOpt = None,
    out_path: Annotated[
        Path | None, typer.Option("--out", help="Trace store to write (default: <run>/trace-track.zarr).")
    ] = None,
) -> None:
    """Trace checkpoints on a fixed probe set (one step per checkpoint at its global step); prints the store path."""
    from vaedyn_cli import track

    cfg = config_mod.load_config(config, set_ or []) if config is not None else None
    overrides = [] if config is not None else (set_ or [])
    print_path(track.track_checkpoints(cfg, [*(checkpoint or []), *(checkpoints or [])], out_path, overrides))


store_app = typer.Typer(help="Inspect trace stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("info")
@handle_errors
def store_info_cmd(
    store: Annotated[str, typer.Argument(help="Trace store, run folder, or - to read the path from stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
) -> None:
    """Summarise a trace store: steps, channels, layers by part, variables, size, events, classification."""
    import json

    from vaedyn_cli import store as store_mod

    info = store_mod.store_info(store_mod.resolve_store_path(store))
    if as_json:
        out(json.dumps(info, indent=2))
        return
    from rich.console import Console

    Console(soft_wrap=True).print(store_mod.info_table(info))


@store_app.command("check")
@handle_errors
def store_check_cmd(
    store: Annotated[str, typer.Argument(help="Trace store, run folder, or - to read the path from stdin.")],
) -> None:
    """Check a trace store for damage (every chunk present and decoding); one OK line, or exit 2 naming the problem."""
    from vaedyn_cli import store as store_mod

    out(store_mod.verify_store(store_mod.resolve_store_path(store)))


def main() -> None:
    """Console-script entry point (`vaedyn_cli.entry` catches signals before importing this module)."""
    errors.catch_signals()
    try:
        app()
    except KeyboardInterrupt as e:  # while typer parses, before a command's own handler
        line, code = errors.interrupt_line(e)
        err(line)
        sys.exit(code)


if __name__ == "__main__":
    main()
