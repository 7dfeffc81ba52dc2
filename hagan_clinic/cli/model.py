"""Commands about one model: check-config, generate, info, promote, import-reference, train."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from .group import cli
from .options import (
    CHECKPOINT_HELP,
    SET_HELP,
    TrackingFlags,
    checkpoint_source,
    config_options,
    count_option,
    device_option,
    load,
    out_option,
    overwrite_option,
    seed_option,
    tracking_options,
    tracking_uri_option,
    verbosity,
)

#: Generated volumes logged as artifacts by a tracked ``generate`` (each can be tens of MB at 256^3).
GENERATE_ARTIFACTS = 4


@cli.command("check-config")
@click.argument("config_file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@verbosity
def check_config(config_file: str, overrides: tuple[str, ...]) -> None:
    """Validate CONFIG_FILE (a path, or a shipped config: base, tiny, demo, paper_128, paper_256); print it resolved."""
    cfg = load(config_file, overrides)
    m = cfg.model
    click.echo(cfg.to_yaml().rstrip())
    click.echo(
        f"# derived: feature map {m.feature_channels}ch x {m.feature_size}^3, G^H stages {m.stages}, "
        f"slab {m.slab_depth} slices ({m.feature_slab_depth} feature slices), "
        f"D^H position = r / {m.max_slab_start}"
    )


@cli.command()
@click.option("--checkpoint", "checkpoint", required=True, help=CHECKPOINT_HELP)
@count_option(1, 1, "Volumes to write")
@out_option("Output folder for NIfTI files.", folder=True)
@seed_option(False, "Same seed, same volumes.")
@click.option("--label", type=int, default=None, help="Class of every sample (conditional checkpoints).")
@click.option("--slab", type=click.IntRange(min=1), default=None,
              help="Run G^H this many feature slices at a time (same output, less memory).")  # fmt: skip
@device_option(from_config=False)
@tracking_options
@overwrite_option
@verbosity
def generate(
    checkpoint: str, n: int, out: str, seed: int, label: int | None, slab: int | None, device: str,
    tracking: TrackingFlags, overwrite: bool,
) -> None:  # fmt: skip
    """Generate volumes from a checkpoint and write them as NIfTI (HU for CT, spacing in the affine)."""
    from ..sampling import generate as run

    path, version = checkpoint_source(checkpoint, tracking, role="generator")
    tracker = tracking.tracker()  # checked now; its run opens only for volumes made (a refused input creates no store)
    result = run(path, n, out, seed, label, slab, device, overwrite, version)
    with tracker.run("generate", tags={"stage": "generate"}):
        tracker.log_params({"checkpoint_sha256": result.checkpoint_sha256, "model_version": version or "-", "n": n,
                            "seed": seed, "label": "-" if label is None else label, "slab": slab or 0})  # fmt: skip
        for sample in result.paths[:GENERATE_ARTIFACTS]:  # a few samples to look at; the rest stay on disk
            tracker.log_artifact(sample, "generated")
        tracker.log_artifact(result.out / "samples.csv", "generated")
    click.echo(result.summary())


@cli.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON (the config in full).")
@tracking_uri_option
@verbosity
def info(checkpoint: str, as_json: bool, tracking_uri: str | None) -> None:
    """What a checkpoint is (a file, or models:/NAME/VERSION or models:/NAME@ALIAS): identity, data contract,
    parameters, training set (size and digests), provenance."""
    import json

    from ..models.hagan import describe_checkpoint

    path, version = checkpoint_source(checkpoint, TrackingFlags(tracking_uri))
    d = describe_checkpoint(path)
    if version:
        d["registered_model"] = version
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    model = d["config"].get("model", {}) if isinstance(d["config"], dict) else {}
    total = sum(d["parameters"].values())
    lines = [
        f"checkpoint     {d['file']}  (sha256 {d['sha256']}, {d['format']})",
        f"model          size {model.get('size')}^3, latent {model.get('latent_dim')}, "
        f"classes {model.get('num_classes')}, parts {', '.join(d['parts'])}",
        "parameters     " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in d["parameters"].items())
        + f" (total {total / 1e6:.2f}M)",
        f"data contract  {d['data_contract']}",
    ]  # fmt: skip
    if version:
        lines.insert(1, f"registered     {version} ({checkpoint})")
    t = d["training_set"]
    if t is None:
        lines.append("training set   not recorded (imported weights, or a checkpoint older than training records)")
    else:
        lines.append(f"training set   {t['n_volumes']} volumes, {t['patients']} patients, {t['series']} series "
                     f"from {t['data_dir']}")  # fmt: skip
        lines.append(f"               table {t['table'] or '-'} (sha256 {t['table_sha256'] or '-'}); "
                     f"file list sha256 {t['files_sha256']}")  # fmt: skip
    lines.append(f"provenance     {d['provenance'] or '-'}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("model")
@click.option("--alias", default="champion", show_default=True, help="The alias to move to this version.")
@tracking_uri_option
@verbosity
def promote(model: str, alias: str, tracking_uri: str | None) -> None:
    """Point an alias (default @champion) at a registered version: MODEL is models:/NAME/VERSION (or NAME/VERSION,
    or models:/NAME@ALIAS); the generator registered from the same checkpoint gets the alias too."""
    from ..tracking.registry import set_alias

    uri = TrackingFlags(tracking_uri).store()
    name_version = set_alias(model, alias, uri)
    click.echo(f"@{alias} -> {name_version} (models:/{name_version.rpartition('/')[0]}@{alias})")


@cli.command("import-reference")
@click.option("--generator", required=True, type=click.Path(dir_okay=False), help="Reference G_iterN.pth.")
@click.option("--encoder", required=True, type=click.Path(dir_okay=False), help="Reference E_iterN.pth (E^H).")
@click.option("--sub-encoder", required=True, type=click.Path(dir_okay=False), help="Reference Sub_E_iterN.pth.")
@click.option("--discriminator", type=click.Path(dir_okay=False), default=None, help="Reference D_iterN.pth.")
@click.option("--size", required=True, type=click.Choice(["128", "256"]), help="Output size of those weights.")
@out_option("Checkpoint to write.", folder=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Data contract, e.g. data.modality=MR.")
@overwrite_option
@verbosity
def import_reference_cmd(
    generator: str, encoder: str, sub_encoder: str, discriminator: str | None, size: str, out: str,
    overrides: tuple[str, ...], overwrite: bool,
) -> None:  # fmt: skip
    """Convert checkpoints of the reference HA-GAN implementation into one hagan-clinic checkpoint."""
    from ..io.files import Outputs
    from ..models.hagan import parameter_table
    from ..reference import import_reference

    guard = Outputs("import-reference", [generator, encoder, sub_encoder, discriminator], overwrite)
    guard.check(out)
    model = import_reference(generator, encoder, sub_encoder, int(size), discriminator, overrides)
    files = [Path(p).name for p in (generator, encoder, sub_encoder)]
    model.save(out, extra={"source": "reference import", "files": files})
    guard.record(out)
    total = sum(v for k, v in parameter_table(model).items() if k in model.parts)
    data = model.config.data
    spacing = "unknown" if data.spacing_mm is None else f"{list(data.spacing_mm)} mm"
    click.echo(f"wrote {out}: parts {', '.join(model.parts)}, {total / 1e6:.2f}M parameters, size {size}^3\n"
               f"preprocessing of scans for this model: data.resize={data.resize}, spacing {spacing}")  # fmt: skip


@cli.command()
@config_options(None, "the model, data and training settings")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Volumes (else data.dir).")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[STATE]",
              help="Continue the run in --out from its latest state, or from the given state file.")  # fmt: skip
@click.option("--run-name", default=None, help="Run name (default: the config's name).")
@out_option("Run folder (default runs/<run name>).", folder=True, required=False)
@device_option(from_config=True)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the data summary, then stop.")
@tracking_options
@verbosity
def train(
    config_file: str, overrides: tuple[str, ...], data_dir: str | None, resume: str | None, run_name: str | None,
    out: str | None, device: str | None, dry_run: bool, tracking: TrackingFlags,
) -> None:  # fmt: skip
    """Train HA-GAN (D, G, E^H, E^G) on a folder of volumes; several GPUs with torchrun."""
    from ..config import resolve_path
    from ..data import VolumeFolder
    from ..devices import resolve_device, torchrun_env

    cfg = load(config_file, overrides)
    if device is not None:  # refused here, in one line, before any data is read
        resolve_device(device)
        cfg = cfg.with_values({"device": device})
    name = run_name or resolve_path(config_file).stem
    run_dir = Path(out) if out else Path("runs") / name
    if dry_run:
        click.echo(f"{cfg.to_yaml().rstrip()}\n# data: {VolumeFolder.from_config(cfg, data_dir).summary()}\n"
                   f"# run folder: {run_dir}")  # fmt: skip
        return
    from ..training.loop import train as run_training

    # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so the MLflow run is closed as KILLED
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tracker = tracking.tracker(cfg.tracking) if torchrun_env().rank == 0 else None
    result = run_training(cfg, run_dir, data_dir=data_dir, resume=resume, run_name=name, tracker=tracker)
    if result.summary():
        click.echo(result.summary())
