"""Commands over a cohort of scans: phantoms, preprocess, qct, encode, and the end-to-end demo."""

from __future__ import annotations

from pathlib import Path

import click

from ..io import logs
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
    invocation,
    load,
    out_option,
    overwrite_option,
    seed_option,
    tracking_options,
    verbosity,
    workers_option,
    workers_or_default,
)


@cli.command()
@click.argument("out_arg", metavar="[OUT]", required=False, type=click.Path(file_okay=False))
@out_option("Output folder (or give it as OUT).", folder=True, required=False)
@count_option(60, 1, "Patients")
@seed_option(False, "Same seed, same cohort.")
@click.option("--shape", default="96,128,128", show_default=True, metavar="SLICES,ROWS,COLS",
              help="Voxels per series (the anatomy is fixed in mm).")  # fmt: skip
@workers_option
@click.option("--couch", "couch_mm", type=click.FloatRange(0, 60), default=0.0, show_default=True, metavar="MM",
              help="A scanner couch under the back with a foam core this thick (0: none).")  # fmt: skip
@click.option("--cushions", is_flag=True, help="A foam blanket over the chest and foam wedges beside the back.")
@click.option("--stomach", is_flag=True, help="A gas bubble in the stomach, under the left hemidiaphragm.")
@overwrite_option
@verbosity
def phantoms(
    out_arg: str | None, out: str | None, n: int, seed: int, shape: str, workers: int | None, couch_mm: float,
    cushions: bool, stomach: bool, overwrite: bool,
) -> None:  # fmt: skip
    """Write a synthetic thorax CT cohort (DICOM) with known lung truth and clinical.csv to --out (or OUT).

    The couch, cushions and stomach leave the lungs, and so the truth, as they are.
    """
    from .. import phantoms as phantom_lib

    if (out_arg is None) == (out is None):
        raise click.UsageError("give the output folder once: --out DIR (or OUT)")
    folder = Path(out or out_arg or "")
    try:
        dims = phantom_lib.parse_shape(shape)
    except phantom_lib.PhantomError as err:
        raise click.BadParameter(str(err), param_hint="--shape") from None
    table = phantom_lib.write_cohort(
        folder, n=n, seed=seed, shape=dims, workers=workers_or_default(workers), couch_mm=couch_mm,
        cushions=cushions, stomach=stomach, overwrite=overwrite, progress=not logs.quiet(),
    )  # fmt: skip
    click.echo(f"{len(table)} patients: {folder / 'clinical.csv'}")


@cli.command()
@click.argument("src", type=click.Path())
@out_option("Cache folder (created; re-runs resume).", folder=True)
@config_options("base", "the data contract")
@workers_option
@click.option("--nifti", is_flag=True, help="Also write each grid as NIfTI (HU, with its affine) under OUT/nifti/.")
@overwrite_option
@verbosity
def preprocess(
    src: str, out: str, config_file: str, overrides: tuple[str, ...], workers: int | None, nifti: bool, overwrite: bool
) -> None:
    """Read every series under SRC (DICOM at any depth, NIfTI) onto the model's grid, with a manifest.csv."""
    from ..pipelines.preprocess import run

    cfg = load(config_file, overrides)
    click.echo(run(src, out, cfg, workers=workers_or_default(workers), nifti=nifti, overwrite=overwrite).summary())


@cli.command()
@click.argument("src", type=click.Path())
@out_option("Table to write (.csv or .parquet; one row per series).", folder=False)
@format_option("csv")
@config_options("base", "the data.* reading options")
@workers_option
@click.option("--masks", "masks", type=click.Path(file_okay=False),
              help="Write each lung mask here as NIfTI (<series_uid>.nii.gz) to check in a viewer.")  # fmt: skip
@click.option("--mask", "external_masks", type=click.Path(file_okay=False),
              help="Measure your own lung masks from this folder (<series_uid>.nii.gz, same grid as the scan) "
              "instead of ours.")  # fmt: skip
@overwrite_option
@verbosity
def qct(
    src: str, out: str, fmt: str | None, config_file: str, overrides: tuple[str, ...], workers: int | None,
    masks: str | None, external_masks: str | None, overwrite: bool,
) -> None:  # fmt: skip
    """Quantitative CT per series under SRC: lung volume, %LAA-950, Perc15, with kernel, slice and mask warnings."""
    from ..pipelines.qct import run

    cfg = load(config_file, overrides)
    result = run(src, out, cfg, workers=workers_or_default(workers), masks=masks, external_masks=external_masks,
                 overwrite=overwrite, fmt=fmt, progress=not logs.quiet())  # fmt: skip
    click.echo(result.summary())


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:  # under torchrun each process takes its own share
        from ..devices import torchrun_env

        env = torchrun_env()
        return env.rank, env.world
    parts = shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise click.BadParameter(f"expected I/N with 0 <= I < N, e.g. 0/4, got '{shard}'", param_hint="--shard")
    return int(parts[0]), int(parts[1])


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--checkpoint", required=True, help=f"{CHECKPOINT_HELP} With E^H and E^G.")
@out_option("Feature table to write.", folder=False)
@format_option("parquet")
@config_options("base", "the encode section (the data contract is the checkpoint's)")
@workers_option
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Volumes per forward. Default: the config's encode.batch_size.")  # fmt: skip
@device_option(from_config=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="Default: the config's encode.precision.")  # fmt: skip
@click.option("--pseudonymize", "salt", default=None, metavar="SALT",
              help="Replace PatientID, UIDs, folders and file names (also in reasons) by salted hashes.")  # fmt: skip
@click.option("--qct", is_flag=True, help="Add lung volume, %LAA-950 and Perc15 columns.")
@click.option("--shard", default=None, metavar="I/N", help="Encode share I of N (default: torchrun's RANK/WORLD_SIZE).")
@tracking_options
@overwrite_option
@verbosity
def encode(
    src: str, checkpoint: str, out: str, fmt: str | None, config_file: str, overrides: tuple[str, ...],
    workers: int | None, batch_size: int | None, device: str | None, precision: str | None, salt: str | None,
    qct: bool, shard: str | None, tracking: TrackingFlags, overwrite: bool,
) -> None:  # fmt: skip
    """Encode every CT series under SRC (DICOM, NIfTI, or a preprocess cache) into one latent-feature table.

    Beside the table, OUT_STEM.report.csv lists every series found with its status and reason. A run that is
    stopped resumes where it was when started again with the same arguments.
    """
    from ..devices import resolve_device
    from ..pipelines.encode import EncodeOptions, run

    if salt is not None and not salt.strip():
        raise click.BadParameter("the salt must not be empty", param_hint="--pseudonymize")
    cfg = load(config_file, overrides, only=("encode", "device", "tracking")).with_values(
        {"batch_size": batch_size, "workers": workers, "precision": precision}, "encode"
    )
    e = cfg.encode
    path, version = checkpoint_source(checkpoint, tracking, cfg.tracking)
    opts = EncodeOptions(
        checkpoint=path, out=Path(out), fmt=table_format(out, fmt, "parquet"),
        workers=workers_or_default(e.workers), batch_size=e.batch_size, precision=e.precision,
        device=str(resolve_device(device or cfg.device)), pseudonymize=salt, qct=qct, shard=_parse_shard(shard),
        overwrite=overwrite, model_version=version, argv=invocation(),
    )  # fmt: skip
    click.echo(run(src, opts, tracking.tracker(cfg.tracking)).summary())


@cli.command()
@out_option("Output folder.", folder=True, required=False, default="demo_out")
@click.option("--fast", is_flag=True, help="Smaller and quicker.")
@tracking_options
@verbosity
def demo(out: str, fast: bool, tracking: TrackingFlags) -> None:
    """Run the end-to-end demo on the built-in synthetic data, logged to OUT/mlruns/ (unless told otherwise)."""
    from ..pipelines.demo import run

    click.echo(run(Path(out), fast=fast, tracking=tracking.choice(None, root=out).checked()).summary())
