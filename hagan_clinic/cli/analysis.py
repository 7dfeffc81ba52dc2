"""Commands that analyse what the model made: regress, predict, evaluate, augment."""

from __future__ import annotations

from pathlib import Path

import click

from ..io.files import table_format
from .group import cli
from .options import (
    CHECKPOINT_HELP,
    TrackingFlags,
    checkpoint_source,
    config_options,
    count_option,
    device_option,
    format_option,
    load,
    out_option,
    overwrite_option,
    seed_option,
    tracking_options,
    tracking_uri_option,
    verbosity,
)


def _names(text: str | None, flag: str) -> tuple[str, ...] | None:
    """A comma-separated flag as names; None when the flag was not given (the config decides)."""
    if text is None:
        return None
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names and flag == "--targets":
        raise click.BadParameter("no targets given", param_hint=flag)
    return names


@cli.command()
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature table (parquet or csv).")
@click.option("--clinical", required=True, type=click.Path(dir_okay=False), help="Clinical table (csv or parquet).")
@config_options("base", "the regress section")
@click.option("--id-column", default=None, help="Column joining the two tables. Default: regress.id_column.")
@click.option("--targets", default=None, help="Clinical columns, comma-separated. Default: regress.targets.")
@click.option("--log-targets", default=None, help="Targets regressed on the log scale (as the paper did).")
@click.option("--gold-column", default=None, help="GOLD stage column (0-4). Default: 'gold' when present.")
@click.option("--feature-regex", default=None, help="Names of the feature columns. Default: regress.feature_regex.")
@click.option("--folds", type=click.IntRange(min=2), default=None, help="Outer folds (by patient). Default: 5.")
@seed_option(True)
@out_option("Output folder.", folder=True)
@format_option("csv")
@tracking_options
@overwrite_option
@verbosity
def regress(
    features: str, clinical: str, config_file: str, overrides: tuple[str, ...], id_column: str | None,
    targets: str | None, log_targets: str | None, gold_column: str | None, feature_regex: str | None,
    folds: int | None, seed: int | None, out: str, fmt: str | None, tracking: TrackingFlags, overwrite: bool,
) -> None:  # fmt: skip
    """Cross-validated regression of clinical measures and GOLD stage from latent features, with baselines.

    Writes metrics.json, predictions.csv (or .parquet with --format parquet), plots and model.skops to --out.
    """
    from ..pipelines.regress import RegressOptions, run

    cfg = load(config_file, overrides)
    wanted, logs = _names(targets, "--targets") or cfg.regress.targets, _names(log_targets, "--log-targets")
    unknown = [t for t in (logs or ()) if t not in wanted]
    if unknown:
        raise click.BadParameter(f"'{unknown[0]}' is not one of --targets", param_hint="--log-targets")
    flags = {"id_column": id_column, "targets": wanted, "log_targets": logs, "gold_column": gold_column,
             "feature_regex": feature_regex, "folds": folds}  # fmt: skip
    cfg = cfg.with_values(flags, "regress").with_values({"seed": seed})
    r = cfg.regress
    opts = RegressOptions(
        targets=list(r.targets), out=Path(out), id_column=r.id_column, log_targets=list(r.log_targets),
        gold_column=r.gold_column or "gold", gold_required=r.gold_column is not None, folds=r.folds, seed=cfg.seed,
        feature_regex=r.feature_regex, overwrite=overwrite, fmt=fmt or "csv",
    )  # fmt: skip
    click.echo(run(features, clinical, opts, tracking.tracker(cfg.tracking)).summary())


@cli.command()
@click.option("--model", "model_path", required=True, help="DIR/model.skops, or runs:/RUN_ID of a regress run.")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature table.")
@out_option("Table of predictions (.csv or .parquet).", folder=False)
@format_option("csv")
@tracking_uri_option
@overwrite_option
@verbosity
def predict(
    model_path: str, features: str, out: str, fmt: str | None, tracking_uri: str | None, overwrite: bool
) -> None:
    """Apply the models fitted by `regress` (DIR/model.skops, or runs:/RUN_ID of the regress run) to a new feature
    table; a model file holding anything but scikit-learn's and numpy's own types is refused, never run."""
    from ..pipelines.regress import predict as run

    uri = TrackingFlags(tracking_uri).store() if model_path.startswith("runs:/") else None  # a file needs no store
    click.echo(run(model_path, features, out, overwrite, table_format(out, fmt, "csv"), tracking_uri=uri).summary())


@cli.command()
@click.option("--checkpoint", required=True, help=CHECKPOINT_HELP)
@click.option("--real", required=True, type=click.Path(), help="Held-out real volumes (a preprocess cache).")
@click.option("--train", "train_dir", type=click.Path(file_okay=False), default=None,
              help="The model's training volumes, for the memorisation check (default: the checkpoint's training "
              "record).")  # fmt: skip
@config_options("base", "the evaluate section")
@count_option(None, 2, "Volumes to generate", "evaluate.n")
@click.option("--feature-net", default=None,
              help="Local MedicalNet weights file (resnet_10.pth ... resnet_50.pth), or 'encoder' (the model's own). "
              "Default: evaluate.feature_net.")  # fmt: skip
@click.option("--measure", type=click.Choice(["laa950_pct", "lung_volume_ml", "mean_hu"]), default=None,
              help="What the latent direction should move. Default: evaluate.measure.")  # fmt: skip
@seed_option(True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: evaluate.batch_size.")
@click.option("--slab", type=click.IntRange(min=1), default=None, help="Generate in slabs (less memory).")
@device_option(from_config=True)
@out_option("Output folder.", folder=True)
@tracking_options
@overwrite_option
@verbosity
def evaluate(
    checkpoint: str, real: str, train_dir: str | None, config_file: str, overrides: tuple[str, ...], n: int | None,
    feature_net: str | None, measure: str | None, seed: int | None, batch_size: int | None, slab: int | None,
    device: str | None, out: str, tracking: TrackingFlags, overwrite: bool,
) -> None:  # fmt: skip
    """FID, MMD, MS-SSIM diversity, memorisation, reconstruction and a latent direction, generated vs real."""
    from ..devices import resolve_device
    from ..pipelines.evaluate import EvaluateOptions, run

    flags = {"n": n, "feature_net": feature_net, "measure": measure, "batch_size": batch_size, "slab": slab}
    cfg = load(config_file, overrides, only=("evaluate", "seed", "device", "tracking")).with_values(flags, "evaluate")
    cfg = cfg.with_values({"seed": seed})
    e = cfg.evaluate
    path, _ = checkpoint_source(checkpoint, tracking, cfg.tracking)
    opts = EvaluateOptions(
        checkpoint=path, real=Path(real), out=Path(out), n=e.n, feature_net=e.feature_net, seed=cfg.seed,
        device=str(resolve_device(device or cfg.device)), batch_size=e.batch_size, measure=e.measure, slab=e.slab,
        train=None if train_dir is None else Path(train_dir), overwrite=overwrite,
    )  # fmt: skip
    click.echo(run(opts, tracking.tracker(cfg.tracking)).summary())


@cli.command()
@config_options(None, "the augment section")
@out_option("Output folder.", folder=True)
@click.option(
    "--write-split",
    is_flag=True,
    help="Only write the split and the training part (train_table.csv) to train the GAN on, then stop.",
)
@device_option(from_config=True)
@tracking_options
@overwrite_option
@verbosity
def augment(
    config_file: str, overrides: tuple[str, ...], out: str, write_split: bool, device: str | None,
    tracking: TrackingFlags, overwrite: bool,
) -> None:  # fmt: skip
    """Train a downstream 3D classifier on real volumes with and without synthetic and classical augmentation.

    The GAN must not have seen a validation or test patient: write the split first (--write-split), train the GAN
    on its training part, then run augment.
    """
    from ..devices import resolve_device
    from ..pipelines import augment as augment_pipeline

    cfg = load(config_file, overrides)
    if write_split:
        from ..io.files import read_csv_table

        split_csv, table = augment_pipeline.write_split(cfg, Path(out), overwrite)
        classes = int(read_csv_table(table, "training table")[cfg.augment.label_column].max()) + 1
        click.echo(f"split: {split_csv}; training part: {table}\n"
                   f"train the GAN on it: hagan-clinic train --config {config_file} --data {cfg.augment.cache} "
                   f"--set data.table={table} --set data.label_column={cfg.augment.label_column} "
                   f"--set model.num_classes={classes}")  # fmt: skip
        return
    dev = str(resolve_device(device or cfg.device))
    if cfg.augment.checkpoint and cfg.augment.checkpoint.startswith("models:/"):  # a registered model
        path, _ = checkpoint_source(cfg.augment.checkpoint, tracking, cfg.tracking)
        cfg = cfg.with_values({"checkpoint": str(path)}, "augment")
    click.echo(augment_pipeline.run(cfg, Path(out), tracking.tracker(cfg.tracking), dev, overwrite).summary())
