"""The ``hagan-clinic`` command line. Thin: parse, load, call one function. Heavy imports live inside commands.

Exit status: 0 done; 2 bad arguments, config, checkpoint or input, or a file the machine refuses (disk full,
read-only, no permission), in one line of at most 300 characters on stderr; 1 out of memory (with advice that fits
the command) or an unexpected internal error (one line; set HAGAN_CLINIC_DEBUG=1 for the traceback); 130
interrupted.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import click

from .errors import MESSAGE_LIMIT, HaganError, one_line
from .io.logs import quiet_readers

SET_HELP = "Override a config value, e.g. --set model.size=128 (repeatable)."
OVERWRITE_HELP = "Replace existing output files that this command did not write (never needed to re-run it)."
#: Every --seed: numpy, torch and sklearn all take 32-bit seeds (the same bound as the config's seed).
SEED = click.IntRange(0, 2**32 - 1)


def _resolve_device(name: str) -> str:
    from .devices import resolve_device

    return str(resolve_device(name))


def _progress(desc: str, unit: str):
    from tqdm import tqdm

    def wrap(iterable):
        return tqdm(iterable, desc=desc, unit=unit, file=sys.stderr, disable=None)

    return wrap


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="hagan-clinic")
def cli() -> None:
    """HA-GAN for 3D CT and MRI cohorts: generate, encode, and import published weights.

    Start with `hagan-clinic demo`; every command has --help.
    """


@cli.command("check-config")
@click.argument("config_file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def check_config(config_file: str, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG_FILE (a path, or a shipped config: base, tiny, demo, paper_128, paper_256); print it resolved."""
    from .config import load_config

    cfg = load_config(config_file, overrides)
    m = cfg.model
    click.echo(cfg.to_yaml().rstrip())
    click.echo(
        f"# derived: feature map {m.feature_channels}ch x {m.feature_size}^3, G^H stages {m.stages}, "
        f"slab {m.slab_depth} slices ({m.feature_slab_depth} feature slices), "
        f"D^H position = r / {m.max_slab_start}"
    )


@cli.command()
@click.option("--checkpoint", "checkpoint", required=True, type=click.Path(dir_okay=False), help="Model file.")
@click.option("-n", "--n", "n", type=click.IntRange(min=1), default=1, show_default=True, help="Volumes to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for NIfTI files.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Same seed, same volumes.")
@click.option("--label", type=int, default=None, help="Class of every sample (conditional checkpoints).")
@click.option(
    "--slab",
    type=click.IntRange(min=1),
    default=None,
    help="Run G^H this many feature slices at a time (same output, less memory).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def generate(
    checkpoint: str, n: int, out: str, seed: int, label: int | None, slab: int | None, device: str, overwrite: bool
) -> None:
    """Generate volumes from a checkpoint and write them as NIfTI (HU for CT, spacing in the affine)."""
    from .io.files import Outputs
    from .models.hagan import load_checkpoint
    from .sampling import generate_to_nifti

    dev = _resolve_device(device)
    model = load_checkpoint(checkpoint, device=dev)
    try:
        paths = generate_to_nifti(
            model, n, out, seed=seed, label=label, slab=slab, progress=_progress("generate", "vol"),
            guard=Outputs("generate", [checkpoint], overwrite),
        )  # fmt: skip
    except ValueError as err:
        raise HaganError(str(err)) from None
    click.echo(f"wrote {len(paths)} volume(s) to {out}")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON (the config in full).")
def info(checkpoint: str, as_json: bool) -> None:
    """What a checkpoint is: identity, data contract, parameters, training set (size and digests), provenance."""
    import json

    from .models.hagan import describe_checkpoint

    d = describe_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    model = d["config"].get("model", {}) if isinstance(d["config"], dict) else {}
    click.echo(f"checkpoint     {d['file']}  (sha256 {d['sha256']}, {d['format']})")
    click.echo(f"model          size {model.get('size')}^3, latent {model.get('latent_dim')}, "
               f"classes {model.get('num_classes')}, parts {', '.join(d['parts'])}")  # fmt: skip
    total = sum(d["parameters"].values())
    click.echo("parameters     " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in d["parameters"].items())
               + f" (total {total / 1e6:.2f}M)")  # fmt: skip
    click.echo(f"data contract  {d['data_contract']}")
    t = d["training_set"]
    if t is None:
        click.echo("training set   not recorded (imported weights, or a checkpoint older than training records)")
    else:
        click.echo(f"training set   {t['n_volumes']} volumes, {t['patients']} patients, {t['series']} series "
                   f"from {t['data_dir']}")  # fmt: skip
        click.echo(f"               table {t['table'] or '-'} (sha256 {t['table_sha256'] or '-'}); "
                   f"file list sha256 {t['files_sha256']}")  # fmt: skip
    click.echo(f"provenance     {d['provenance'] or '-'}")


@cli.command("import-reference")
@click.option("--generator", required=True, type=click.Path(dir_okay=False), help="Reference G_iterN.pth.")
@click.option("--encoder", required=True, type=click.Path(dir_okay=False), help="Reference E_iterN.pth (E^H).")
@click.option("--sub-encoder", required=True, type=click.Path(dir_okay=False), help="Reference Sub_E_iterN.pth.")
@click.option("--discriminator", type=click.Path(dir_okay=False), default=None, help="Reference D_iterN.pth.")
@click.option("--size", required=True, type=click.Choice(["128", "256"]), help="Output size of those weights.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Checkpoint to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Data contract, e.g. data.modality=MR.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def import_reference_cmd(
    generator: str,
    encoder: str,
    sub_encoder: str,
    discriminator: str | None,
    size: str,
    out: str,
    overrides: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Convert checkpoints of the reference HA-GAN implementation into one hagan-clinic checkpoint."""
    from .io.files import Outputs
    from .models.hagan import parameter_table
    from .reference import import_reference

    guard = Outputs("import-reference", [generator, encoder, sub_encoder, discriminator], overwrite)
    guard.check(out)
    model = import_reference(generator, encoder, sub_encoder, int(size), discriminator, overrides)
    model.save(
        out,
        extra={
            "source": "reference import",
            "files": [Path(p).name for p in (generator, encoder, sub_encoder)],
        },
    )
    guard.record(out)
    total = sum(v for k, v in parameter_table(model).items() if k in model.parts)
    click.echo(f"wrote {out}: parts {', '.join(model.parts)}, {total / 1e6:.2f}M parameters, size {size}^3")
    data = model.config.data
    spacing = "unknown" if data.spacing_mm is None else f"{list(data.spacing_mm)} mm"
    click.echo(f"preprocessing of scans for this model: data.resize={data.resize}, spacing {spacing}")


@cli.command()
@click.option(
    "--config",
    "config_file",
    required=True,
    help="Config file (a path, or a shipped config's name: tiny, demo, paper_128, ...).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Volumes (else data.dir).")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    metavar="[STATE]",
    help="Continue the run in --out from its latest state, or from the given state file.",
)
@click.option("--run-name", default=None, help="Run name (default: the config's name).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<run name>).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the data summary, then stop.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def train(
    config_file: str,
    overrides: tuple[str, ...],
    data_dir: str | None,
    resume: str | None,
    run_name: str | None,
    out: str | None,
    dry_run: bool,
    no_tracking: bool,
) -> None:
    """Train HA-GAN (D, G, E^H, E^G) on a folder of volumes; several GPUs with torchrun."""
    from .config import load_config, resolve_path
    from .data import VolumeFolder

    cfg = load_config(config_file, overrides)
    name = run_name or resolve_path(config_file).stem
    run_dir = Path(out) if out else Path("runs") / name
    if dry_run:
        click.echo(cfg.to_yaml().rstrip())
        click.echo(f"# data: {VolumeFolder.from_config(cfg, data_dir).summary()}")
        click.echo(f"# run folder: {run_dir}")
        return
    import signal

    from .tracking import Tracker
    from .training.loop import train as run_training

    # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so the MLflow run is closed as KILLED
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tracker = None
    if cfg.tracking.enabled and not no_tracking and int(os.environ.get("RANK", "0")) == 0:
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)
    result = run_training(cfg, run_dir, data_dir=data_dir, resume=resume, run_name=name, tracker=tracker)
    if result.snapshot is not None:
        click.echo(f"trained to iteration {result.iteration}: {result.snapshot}")


def _summary_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder (created; re-runs resume).")
@click.option("--config", "config_file", default="base", show_default=True, help="Config with the data contract.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--nifti", is_flag=True, help="Also write each grid as NIfTI (HU, with its affine) under OUT/nifti/.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def preprocess(
    src: str, out: str, config_file: str, overrides: tuple[str, ...], workers: int, nifti: bool, overwrite: bool
) -> None:
    """Read every series under SRC (DICOM at any depth, NIfTI) onto the model's grid, with a manifest.csv."""
    from hagan_clinic.pipelines.preprocess import run

    from .config import load_config

    cfg = load_config(config_file, overrides)
    result = run(src, out, cfg, workers=workers, nifti=nifti, overwrite=overwrite)
    click.echo(f"{_summary_line(result.counts)}: {result.manifest}")


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV to write (one row per series).")
@click.option("--config", "config_file", default="base", show_default=True, help="Config (data.* reading options).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option(
    "--masks",
    "masks",
    type=click.Path(file_okay=False),
    help="Write each lung mask here as NIfTI (<series_uid>.nii.gz) to check in a viewer.",
)
@click.option(
    "--mask",
    "external_masks",
    type=click.Path(file_okay=False),
    help="Measure your own lung masks from this folder (<series_uid>.nii.gz, same grid as the scan) instead of ours.",
)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def qct(
    src: str,
    out: str,
    config_file: str,
    overrides: tuple[str, ...],
    workers: int,
    masks: str | None,
    external_masks: str | None,
    overwrite: bool,
) -> None:
    """Quantitative CT per series under SRC: lung volume, %LAA-950, Perc15, with kernel, slice and mask warnings."""
    from hagan_clinic.pipelines.qct import run

    from .config import load_config

    cfg = load_config(config_file, overrides)
    result = run(src, out, cfg, workers=workers, masks=masks, external_masks=external_masks, overwrite=overwrite)
    click.echo(f"{_summary_line(result.counts)}: {result.path}")


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if shard is None:  # under torchrun each process takes its own share
        from .devices import torchrun_env

        env = torchrun_env()
        return env.rank, env.world
    parts = shard.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 <= int(parts[0]) < int(parts[1]):
        raise click.BadParameter(f"expected I/N with 0 <= I < N, e.g. 0/4, got '{shard}'", param_hint="--shard")
    return int(parts[0]), int(parts[1])


@cli.command()
@click.argument("src", type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Model file (with E^H and E^G).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Feature table to write.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default=None, help="Default: from --out.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Reader processes (0: read in the main process). Default: 0 on 1-2 cores, else cores/2 (max 4).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Volumes per forward.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--pseudonymize", "salt", default=None, metavar="SALT",
              help="Replace PatientID, UIDs, folders and file names (also in reasons) by salted hashes.")  # fmt: skip
@click.option("--qct", is_flag=True, help="Add lung volume, %LAA-950 and Perc15 columns.")
@click.option("--shard", default=None, metavar="I/N", help="Encode share I of N (default: torchrun's RANK/WORLD_SIZE).")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def encode(
    src: str, checkpoint: str, out: str, fmt: str | None, workers: int | None, batch_size: int, device: str,
    precision: str, salt: str | None, qct: bool, shard: str | None, no_tracking: bool, overwrite: bool,
) -> None:  # fmt: skip
    """Encode every CT series under SRC (DICOM, NIfTI, or a preprocess cache) into one latent-feature table.

    Beside the table, OUT_STEM.report.csv lists every series found with its status and reason. A run that is
    stopped resumes where it was when started again with the same arguments.
    """
    from hagan_clinic.pipelines.encode import EncodeOptions, run

    from .tracking import NullTracker, Tracker

    out_path = Path(out)
    if workers is None:  # on two cores a reader process competes with the encoder instead of overlapping it
        cores = os.cpu_count() or 1
        workers = 0 if cores <= 2 else min(4, cores // 2)
    fmt = fmt or ("csv" if out_path.suffix.lower() == ".csv" else "parquet")
    if salt is not None and not salt.strip():
        raise click.BadParameter("the salt must not be empty", param_hint="--pseudonymize")
    opts = EncodeOptions(
        checkpoint=Path(checkpoint), out=out_path, fmt=fmt, workers=workers, batch_size=batch_size,
        device=_resolve_device(device), precision=precision, pseudonymize=salt, qct=qct, shard=_parse_shard(shard),
        overwrite=overwrite,
    )  # fmt: skip
    tracker = NullTracker() if no_tracking else Tracker()
    result = run(src, opts, tracker)
    if result.table is None:
        click.echo(f"shard {opts.shard[0]}/{opts.shard[1]} done; the table is written by the last shard to finish")
    else:
        click.echo(f"{_summary_line(result.counts)}: {result.table} (report: {result.report})")


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@cli.command()
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature table (parquet or csv).")
@click.option("--clinical", required=True, type=click.Path(dir_okay=False), help="Clinical table (csv or parquet).")
@click.option("--id-column", default="patient_id", show_default=True, help="Column joining the two tables.")
@click.option("--targets", default="fev1pp,fev1_fvc,pct_emphysema", show_default=True, help="Clinical columns.")
@click.option("--log-targets", default="", help="Targets regressed on the log scale (as the paper did).")
@click.option("--gold-column", default=None, help="GOLD stage column (0-4). Default: 'gold' when present.")
@click.option("--feature-regex", default=r"z\d+", show_default=True, help="Names of the feature columns.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Outer folds (by patient).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def regress(
    features: str, clinical: str, id_column: str, targets: str, log_targets: str, gold_column: str | None,
    feature_regex: str, folds: int, seed: int, out: str, no_tracking: bool, overwrite: bool,
) -> None:  # fmt: skip
    """Cross-validated regression of clinical measures and GOLD stage from latent features, with baselines."""
    from hagan_clinic.pipelines.regress import RegressOptions, r2_text, run

    from .tracking import NullTracker, Tracker

    wanted, logs = _names(targets), _names(log_targets)
    unknown = [t for t in logs if t not in wanted]
    if unknown:
        raise click.BadParameter(f"'{unknown[0]}' is not one of --targets", param_hint="--log-targets")
    opts = RegressOptions(
        targets=wanted, out=Path(out), id_column=id_column, log_targets=logs, gold_column=gold_column or "gold",
        gold_required=gold_column is not None, folds=folds, seed=seed, feature_regex=feature_regex,
        overwrite=overwrite,
    )  # fmt: skip
    metrics = run(features, clinical, opts, NullTracker() if no_tracking else Tracker())
    for note in metrics["notes"].values():
        click.echo(f"note: {note}")
    for name, s in metrics["targets"].items():  # the names and numbers of metrics.json and of the MLflow run
        fold = f"r2_fold_mean {s['r2_fold_mean']:.3f} +- {s['r2_fold_sd']:.3f}" if s["r2_fold_mean"] is not None else ""
        parts = [r2_text(s), *([r2_text(s, "r2_log")] if "r2_log" in s else []), fold]
        for kind, per_target in metrics["baselines"].items():
            b = per_target[name]
            parts.append(f"baseline_{kind}.{r2_text(b)}" if "r2" in b else f"baseline_{kind} skipped ({b['skipped']})")
        click.echo(f"{name}: {'; '.join(p for p in parts if p)}; n {s['n']} ({s['n_patients']} patients)")
    for kind, s in metrics["gold"].items():
        click.echo(f"GOLD {kind}: accuracy {s['accuracy']:.3f}, quadratic_kappa {s['quadratic_kappa']:.3f}")
    click.echo(f"written to {out}")


@cli.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="DIR/model.joblib.")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="Feature table.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="CSV of predictions.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def predict(model_path: str, features: str, out: str, overwrite: bool) -> None:
    """Apply a model fitted by `regress` to a new feature table (only load model files you made)."""
    from hagan_clinic.pipelines.regress import predict as run_predict

    table, notes = run_predict(model_path, features, out, overwrite)
    for note in notes:
        click.echo(f"note: {note}")
    click.echo(f"{len(table)} rows: {out}")


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Model file.")
@click.option("--real", required=True, type=click.Path(), help="Held-out real volumes (a preprocess cache).")
@click.option(
    "--train",
    "train_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="The model's training volumes, for the memorisation check (default: the checkpoint's training record).",
)
@click.option("--n", "n", type=click.IntRange(min=2), default=512, show_default=True, help="Volumes to generate.")
@click.option(
    "--feature-net",
    default="encoder",
    show_default=True,
    help="Local MedicalNet weights file (resnet_10.pth ... resnet_50.pth), or 'encoder' (the model's own).",
)
@click.option("--measure", type=click.Choice(["laa950_pct", "lung_volume_ml", "mean_hu"]), default="laa950_pct",
              show_default=True, help="What the latent direction should move.")  # fmt: skip
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--slab", type=click.IntRange(min=1), default=None, help="Generate in slabs (less memory).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def evaluate(
    checkpoint: str, real: str, train_dir: str | None, n: int, feature_net: str, measure: str, seed: int,
    batch_size: int, slab: int | None, device: str, out: str, no_tracking: bool, overwrite: bool,
) -> None:  # fmt: skip
    """FID, MMD, MS-SSIM diversity, memorisation, reconstruction and a latent direction, generated vs real."""
    from hagan_clinic.pipelines.evaluate import EvaluateOptions, run

    from .tracking import NullTracker, Tracker

    opts = EvaluateOptions(
        checkpoint=Path(checkpoint), real=Path(real), out=Path(out), n=n, feature_net=feature_net, seed=seed,
        device=_resolve_device(device), batch_size=batch_size, measure=measure, slab=slab,
        train=None if train_dir is None else Path(train_dir), overwrite=overwrite,
    )  # fmt: skip
    m = run(opts, NullTracker() if no_tracking else Tracker())
    click.echo(f"FID {m['fid']:.3f}, MMD^2 {m['mmd2']:.4f} ({m['feature_net']}); MS-SSIM generated "
               f"{m['ms_ssim_generated']:.3f}, real {m['ms_ssim_real']:.3f}; written to {out}")  # fmt: skip
    mem = m["memorisation"]
    if "skipped" in mem:
        click.echo(f"memorisation: not checked ({mem['skipped']})")
    else:
        verdict = (
            "FLAGGED: generated volumes sit closer to the training set than held-out ones"
            if mem["flagged"]
            else "not flagged"
        )
        click.echo(f"memorisation vs the training set: median ratio {mem['median_ratio']:.2f}, fraction closer than "
                   f"held-out p5 {mem['fraction_closer_than_heldout_p5']:.2f}: {verdict}")  # fmt: skip


@cli.command()
@click.option("--config", "config_file", required=True, help="Config with an augment section.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--write-split",
    is_flag=True,
    help="Only write the split and the training part (train_table.csv) to train the GAN on, then stop.",
)
@click.option("--device", default=None, help="Classifier device: cpu, cuda, cuda:N or auto (default: the config's).")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def augment(
    config_file: str, overrides: tuple[str, ...], out: str, write_split: bool, device: str | None, no_tracking: bool,
    overwrite: bool,
) -> None:  # fmt: skip
    """Train a downstream 3D classifier on real volumes with and without synthetic and classical augmentation.

    The GAN must not have seen a validation or test patient: write the split first (--write-split), train the GAN
    on its training part, then run augment.
    """
    from hagan_clinic.pipelines import augment as augment_pipeline

    from .config import load_config
    from .tracking import NullTracker, Tracker

    cfg = load_config(config_file, overrides)
    if write_split:
        from .io.files import read_csv_table

        split_csv, table = augment_pipeline.write_split(cfg, Path(out), overwrite)
        classes = int(read_csv_table(table, "training table")[cfg.augment.label_column].max()) + 1
        click.echo(f"split: {split_csv}; training part: {table}")
        click.echo(f"train the GAN on it: hagan-clinic train --config {config_file} --data {cfg.augment.cache} "
                   f"--set data.table={table} --set data.label_column={cfg.augment.label_column} "
                   f"--set model.num_classes={classes}")  # fmt: skip
        return
    tracker = NullTracker() if no_tracking else Tracker()
    table = augment_pipeline.run(cfg, Path(out), tracker, _resolve_device(device or cfg.device), overwrite)
    for row in table:
        text = ", ".join(f"{m} {row[m + '_mean']:.3f} +- {row[m + '_sd']:.3f}" for m in augment_pipeline.METRICS)
        if "auc_diff" in row:
            lo, hi = row["balanced_accuracy_diff_ci"]
            blo, bhi = row["balanced_accuracy_diff_boot_ci"]
            text += (f"; balanced accuracy vs real {row['balanced_accuracy_diff']:+.3f} (seeds [{lo:+.3f}, {hi:+.3f}]; "
                     f"test patients [{_fmt(blo)}, {_fmt(bhi)}])")  # fmt: skip
        click.echo(f"{row['arm']}: {text}")
    click.echo(f"written to {out}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", type=click.IntRange(min=1), default=60, show_default=True, help="Patients.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Same seed, same cohort.")
@click.option(
    "--shape",
    default="96,128,128",
    show_default=True,
    metavar="SLICES,ROWS,COLS",
    help="Voxels per series (the anatomy is fixed in mm).",
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option(
    "--couch",
    "couch_mm",
    type=click.FloatRange(0, 60),
    default=0.0,
    show_default=True,
    metavar="MM",
    help="A scanner couch under the back with a foam core this thick (0: none).",
)
@click.option("--cushions", is_flag=True, help="A foam blanket over the chest and foam wedges beside the back.")
@click.option("--stomach", is_flag=True, help="A gas bubble in the stomach, under the left hemidiaphragm.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
def phantoms(
    out: str, n: int, seed: int, shape: str, workers: int, couch_mm: float, cushions: bool, stomach: bool,
    overwrite: bool,
) -> None:  # fmt: skip
    """Write a synthetic thorax CT cohort (DICOM) with known lung truth and clinical.csv to OUT.

    The couch, cushions and stomach leave the lungs, and so the truth, as they are.
    """
    from .phantoms import PhantomError, write_cohort
    from .phantoms.render import _check_shape

    parts = shape.replace("x", ",").split(",")
    # ASCII digits only, and few of them: int() of a thousands-digit string raises (and str.isdigit takes '²')
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]{1,9}", p.strip()) for p in parts):
        raise click.BadParameter(f"expected three integers like 96,128,128, got {shape[:40]!r}", param_hint="--shape")
    try:
        dims = _check_shape(int(p) for p in parts)
    except PhantomError as err:
        raise click.BadParameter(str(err), param_hint="--shape") from None
    table = write_cohort(
        Path(out), n=n, seed=seed, shape=dims, workers=workers, couch_mm=couch_mm, cushions=cushions, stomach=stomach,
        overwrite=overwrite,
    )  # fmt: skip
    click.echo(f"{len(table)} patients: {Path(out) / 'clinical.csv'}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True)
@click.option("--fast", is_flag=True, help="Smaller and quicker.")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
def demo(out: str, fast: bool, no_tracking: bool) -> None:
    """Run the end-to-end demo on the built-in synthetic data, logged to mlruns/."""
    from hagan_clinic.pipelines.demo import run

    run(Path(out), fast=fast, tracking=not no_tracking)


#: What to try when a command runs out of memory, by command (only generate and evaluate have --slab).
MEMORY_ADVICE = {
    "generate": "generate with --slab 4 (or smaller) to bound it",
    "evaluate": "use --slab 4 (or smaller) and a smaller --batch-size",
    "encode": "use --batch-size 1 and fewer --workers",
    "preprocess": "use fewer --workers",
    "qct": "use fewer --workers",
    "phantoms": "use a smaller --shape or fewer --workers",
    "train": "use a smaller train.batch_size or model.size (--set)",
    "augment": "use a smaller augment.batch_size or a larger augment.downsample (--set)",
}
#: OS errors that say the machine refused a file (a full, read-only or forbidden disk), not that our code is wrong.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
ACCESS_ERRORS = {errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EIO, errno.ELOOP,
                 errno.EMFILE, errno.ENFILE}  # fmt: skip


def _command_name(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "")


def _disk_error(err: BaseException) -> OSError | None:
    """The OSError of a refused file in ``err`` or its chain (torch wraps a failed write in a RuntimeError)."""
    for _ in range(4):
        if isinstance(err, OSError) and err.errno in WRITE_ERRORS | ACCESS_ERRORS:
            return err
        if err.__cause__ is None and err.__context__ is None:
            return None
        err = err.__cause__ or err.__context__
    return None


def _disk_message(err: OSError) -> str:
    verb = "write" if err.errno in WRITE_ERRORS else "access"
    name = f" {Path(os.fsdecode(err.filename)).name}" if err.filename else ""
    return f"cannot {verb}{name}: {err.strerror or os.strerror(err.errno or 0)}"


def _say(line: str) -> None:
    click.echo(one_line(line), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and documented exit codes instead of tracebacks."""
    prog = "hagan-clinic"
    for stream in (sys.stdout, sys.stderr):  # an argument with bytes that are no UTF-8 must print, not crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    quiet_readers()
    try:
        cli.main(args=argv, prog_name=prog, standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        _say(f"{prog}: interrupted")
        return 130
    except click.ClickException as err:
        hint = ""
        if isinstance(err, click.UsageError) and err.ctx is not None:
            hint = f" (see '{err.ctx.command_path} --help')"
        message = one_line(err.format_message(), MESSAGE_LIMIT - len(prog) - len(hint) - 9)
        _say(f"{prog}: error: {message}{hint}")
        return err.exit_code
    except HaganError as err:
        _say(f"{prog}: error: {err}")
        return 2
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as err:  # an unexpected failure still ends in one line unless asked for more
        if os.environ.get("HAGAN_CLINIC_DEBUG"):
            raise
        refused = _disk_error(err)
        if refused is not None:
            _say(f"{prog}: error: {_disk_message(refused)}")
            return 2
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            advice = MEMORY_ADVICE.get(_command_name(argv))
            _say(f"{prog}: error: out of memory" + (f"; {advice}" if advice else ""))
            return 1
        what = one_line(f"{type(err).__name__}: {err}", 200)
        _say(f"{prog}: internal error: {what} (HAGAN_CLINIC_DEBUG=1 shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
