"""``hagan-clinic evaluate``: how close generated volumes are to real ones, how diverse, whether they copy the
training set, how well real volumes survive encode-then-generate, and what a direction in latent space does.

Real volumes are on the model's grid: a preprocess cache (its manifest's ok rows) or a folder of ``.npy`` (in
[-1, 1]) or NIfTI (scanner units) files of size S^3. Every distribution metric names its feature network and the
SHA-256 of its weights (see hagan_clinic.feature_nets).

Outputs in DIR: metrics.json, samples.png (generated and real mid-slices), latent_direction.png (the paper's
Fig. 5: slices along a latent direction that moves a measure, with the measure per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hagan_clinic.config import Config
from hagan_clinic.errors import HaganError
from hagan_clinic.io.cache import Cache, load_grid, looks_like_cache, open_cache, require_finite
from hagan_clinic.io.files import Outputs, atomic_target, make_folder, write_json
from hagan_clinic.io.logs import progress

MEASURES = ("laa950_pct", "lung_volume_ml", "mean_hu")


@dataclass
class EvaluateOptions:
    checkpoint: Path
    real: Path
    out: Path
    n: int = 512
    feature_net: str = "encoder"
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    n_diversity: int = 6  # volumes per set for pairwise MS-SSIM (15 pairs): the 3D windows cost ~0.1-0.5 s a pair
    n_recon: int = 8
    measure: str = "laa950_pct"
    slab: int | None = None
    train: Path | None = None  # the model's training volumes; default: the checkpoint's training record
    overwrite: bool = False


OUTPUT_NAMES = ("metrics.json", "samples.png", "latent_direction.png")


def real_volumes(folder: Path, cfg: Config) -> tuple[list[Path], Cache | None]:
    """The real volumes, and their cache when ``folder`` is one: a preprocess cache's ok rows (refused in one line
    when it was made at other settings than the checkpoint's config), else every .npy (on the grid) and NIfTI scan
    under ``folder`` (each checked when it is loaded)."""
    if not folder.is_dir():
        raise HaganError(f"real volumes not found: {folder}")
    cache = None
    if looks_like_cache(folder):
        cache = open_cache(folder, cfg, by="the checkpoint")
        cache.require_volumes()
        files = [cache.path_of(i) for i in range(len(cache))]
    else:
        files = sorted(p for p in folder.rglob("*") if p.name.endswith((".npy", ".nii", ".nii.gz")))
    if len(files) < 2:
        raise HaganError(f"{folder}: {len(files)} real volume(s); at least 2 are needed")
    return files, cache


def training_volumes(opts: EvaluateOptions, cfg: Config) -> tuple[list[Path], str]:
    """The model's training volumes for the memorisation check: ``--train``, else the checkpoint's training
    record (its data folder and files). ([], reason) when neither is at hand. A cache among them is checked
    against the checkpoint's config like ``--real``."""
    if opts.train is not None:
        return real_volumes(opts.train, cfg)[0], f"--train {opts.train}"
    from hagan_clinic.models.hagan import training_record

    record = training_record(opts.checkpoint)
    if record is None:
        return [], "the checkpoint has no training record and no --train was given"
    root = Path(record.get("data_dir", ""))
    files = [root / f for f in record.get("files", [])]
    missing = [f for f in files if not f.is_file()]
    if missing or len(files) < 2:
        return [], f"the training volumes of the record are not at hand ({len(missing)} of {len(files)} missing)"
    if looks_like_cache(root):
        open_cache(root, cfg, by="the checkpoint")
    return files, f"training record ({root})"


def load_real(path: Path, cfg: Config) -> np.ndarray:
    """One real volume on the model's grid, float32 (S, S, S) in [-1, 1]: a cached array as stored (checked: no
    pickles, the grid's shape, finite values), a NIfTI scan preprocessed as encode does."""
    from hagan_clinic.io.nifti import read_scan
    from hagan_clinic.io.volume import SeriesError
    from hagan_clinic.preprocessing import model_input

    size = cfg.model.size
    try:
        if path.suffix == ".npy":
            vol = load_grid(path, size, path.name)
        else:
            vol = model_input(read_scan(path, cfg.data.modality), cfg)
            require_finite(vol)
    except SeriesError as err:
        raise HaganError(f"{path}: {err}") from None
    if vol.shape != (size,) * 3:
        raise HaganError(f"{path}: shape {vol.shape}, but the model's grid is {size}^3 (preprocess it first)")
    return vol


def measure_volume(vol: np.ndarray, contract: dict, measure: str) -> float:
    """A measure of one volume in [-1, 1] on the contract's grid: QCT of the lungs, or the mean HU."""
    from hagan_clinic.io.nifti import from_model_range

    hu = from_model_range(vol, contract["window"])
    if measure == "mean_hu":
        return float(hu.mean())
    from hagan_clinic.qct import measure as qct

    if contract.get("spacing_mm") is None:
        raise HaganError(
            f"--measure {measure} needs millimetres, but this model's grid has no defined spacing "
            "(reference resize): use --measure mean_hu"
        )

    # the grid pads the scan with air slices; a lung reaching the end of the scan would join that air and be
    # taken for outside air, so the measure looks at the slices with body only, as a scan would have them
    body = np.flatnonzero((hu > -500).any(axis=(1, 2)))
    if body.size == 0:
        return float("nan")
    try:
        return float(qct(hu[body[0] : body[-1] + 1], tuple(contract["spacing_mm"]))[measure])
    except HaganError:  # no lung in this sample
        return float("nan")


def _memorisation(opts, cfg, net, rec_model, training, real_files, real_cache, real_feats, gen_feats) -> dict:
    """Generated volumes against the model's training volumes (``training``: their files and where they came from),
    with the held-out real volumes (``--real``, less any file whose content is a training file's) as the yardstick;
    'skipped' with the reason when no training set is at hand: the check is never silently against the wrong set."""
    import torch

    from hagan_clinic.io.torch_files import file_sha256
    from hagan_clinic.metrics import memorisation_check

    train_files, source = training
    if not train_files:
        return {"skipped": source}
    trained = {file_sha256(f) for f in train_files}  # by content: a copy under another name is still seen
    keep = [i for i, f in enumerate(real_files) if file_sha256(f) not in trained]
    by_record = _trained_by_record(opts, real_cache)  # and by patient or series
    keep = [i for i in keep if real_files[i] not in by_record]
    if len(keep) < 2:
        return {"skipped": "fewer than 2 of the --real volumes are held out from the training set"}
    feats = []
    for i in range(0, len(train_files), opts.batch_size):
        x = torch.from_numpy(np.stack([load_real(p, cfg) for p in train_files[i : i + opts.batch_size]]))[:, None]
        with torch.no_grad():
            feats.append(
                rec_model.encode(x).double().cpu().numpy() if opts.feature_net == "encoder" else net.extract(x)
            )
    result = memorisation_check(gen_feats, np.concatenate(feats), real_feats[keep])
    if not result["median_heldout_to_train"] > 0:
        return {"skipped": "the held-out volumes coincide with training volumes in feature space: no yardstick"}
    result["training_set"] = source
    result["heldout_excluded_as_training"] = len(real_files) - len(keep)
    return result


def _trained_by_record(opts: EvaluateOptions, cache: Cache | None) -> set[Path]:
    """The --real cache files whose patient or series the checkpoint's training record names."""
    from hagan_clinic.models.hagan import training_record

    from .augment import _same_id

    record = training_record(opts.checkpoint)
    if record is None or cache is None:
        return set()
    patients = {_same_id(p) for p in record.get("patient_ids") or []}
    series = set(record.get("series_uids") or []) - {""}
    return {cache.path_of(i) for i, row in enumerate(cache.rows)
            if _same_id(row.get("patient_id", "")) in patients or row.get("series_uid", "") in series}  # fmt: skip


def _pairwise_ms_ssim(vols: list[np.ndarray]) -> float | None:
    from hagan_clinic.metrics import ms_ssim_3d

    scores = [ms_ssim_3d(vols[i], vols[j]) for i in range(len(vols)) for j in range(i + 1, len(vols))]
    return float(np.mean(scores)) if scores else None


def _latent_direction(model, fits: dict, opts: EvaluateOptions, contract, out: Path) -> dict:
    """Least-squares direction in latent space that increases the measure, and slices along it.

    ``fits``: {'generated': (z, values), 'encoded real': (z, values)}. The measure on generated volumes is
    preferred; when too few of them have it (a young model's samples may have no lungs), the direction is
    fitted on the encoded real volumes instead (the paper's alternative), and the report says which.
    """
    import torch

    from hagan_clinic.sampling import sample_latent

    counts = {}
    for source, (z, values) in fits.items():  # noqa: B007 - the loop picks z and values for below
        keep = np.isfinite(values)
        counts[source] = int(keep.sum())
        if keep.sum() >= 10:
            break
    else:
        return {"skipped": f"the measure could be computed on too few volumes ({counts})"}
    zc, vc = z[keep] - z[keep].mean(0), values[keep] - values[keep].mean()
    ridge = 1e-3 * np.trace(zc.T @ zc) / zc.shape[1]
    w = np.linalg.solve(zc.T @ zc + ridge * np.eye(zc.shape[1]), zc.T @ vc)
    w /= np.linalg.norm(w)
    steps = np.linspace(-3.0, 3.0, 7)  # in units of the prior's standard deviation along w
    start = sample_latent(opts.seed + 1, 0, z.shape[1]).numpy()[0]
    start = start - (start @ w) * w
    zs = torch.from_numpy(np.stack([start + t * w for t in steps]).astype(np.float32))
    y = torch.zeros(len(zs), dtype=torch.long) if model.config.model.num_classes else None  # class 0 throughout
    with torch.no_grad():
        vols = [v[0].float().cpu().numpy() for v in model.generate(zs, y, slab=opts.slab)]
    measured = [measure_volume(v, contract, opts.measure) for v in vols]
    _montage(out / "latent_direction.png", vols, steps, measured, opts.measure)
    finite = np.isfinite(measured)
    r = float(np.corrcoef(steps[finite], np.asarray(measured)[finite])[0, 1]) if finite.sum() > 2 else None
    return {"measure": opts.measure, "steps": steps.tolist(), "values": measured, "step_correlation": r,
            "fitted_on": source, "fit_samples": int(keep.sum())}  # fmt: skip


def _montage(path: Path, vols, steps, values, measure: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(vols), figsize=(1.9 * len(vols), 4.0))
    for k, (vol, t, v) in enumerate(zip(vols, steps, values)):
        d, h = vol.shape[0] // 2, vol.shape[1] // 2
        axes[0, k].imshow(vol[d], cmap="gray", vmin=-1, vmax=1)
        axes[1, k].imshow(vol[:, h, :], cmap="gray", vmin=-1, vmax=1, origin="lower")
        axes[0, k].set_title(f"t={t:+.1f}\n{measure}={v:.1f}", fontsize=7)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@dataclass
class EvaluateResult:
    metrics: dict  # what metrics.json holds
    out: Path

    def summary(self) -> str:
        """What ``hagan-clinic evaluate`` prints: the distribution metrics, diversity, and the memorisation check."""
        m, mem = self.metrics, self.metrics["memorisation"]
        lines = [
            f"FID {m['fid']:.3f}, MMD^2 {m['mmd2']:.4f} ({m['feature_net']}); MS-SSIM generated "
            f"{m['ms_ssim_generated']:.3f}, real {m['ms_ssim_real']:.3f}; written to {self.out}"
        ]
        if "skipped" in mem:
            lines.append(f"memorisation: not checked ({mem['skipped']})")
        else:
            verdict = "not flagged"
            if mem["flagged"]:
                verdict = "FLAGGED: generated volumes sit closer to the training set than held-out ones"
            lines.append(
                f"memorisation vs the training set: median ratio {mem['median_ratio']:.2f}, fraction closer than "
                f"held-out p5 {mem['fraction_closer_than_heldout_p5']:.2f}: {verdict}"
            )
        return "\n".join(lines)


@dataclass
class _Pass:
    """Features (N, F), latents (N, L), the measure (N,) and a few volumes (S, S, S) kept, of one set of volumes."""

    feats: np.ndarray
    z: np.ndarray
    values: np.ndarray
    kept: list[np.ndarray]


def _real_pass(files: list[Path], cfg: Config, opts: EvaluateOptions, rec_model, net) -> _Pass:
    """The real volumes through the encoder (and the feature network), a few kept for diversity and reconstruction."""
    import torch

    feats: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    values: list[float] = []
    kept: list[np.ndarray] = []
    keep = max(opts.n_diversity, opts.n_recon)
    for i in progress(range(0, len(files), opts.batch_size), "real volumes", "batch"):
        vols = [load_real(p, cfg) for p in files[i : i + opts.batch_size]]
        kept += vols[: max(0, keep - len(kept))]
        x = torch.from_numpy(np.stack(vols))[:, None]
        with torch.no_grad():
            zs.append(rec_model.encode(x).float().cpu().numpy())
        # with the encoder as the feature network, its features are these latents: no second pass
        feats.append(zs[-1].astype(np.float64) if opts.feature_net == "encoder" else net.extract(x))
        values += [measure_volume(v, cfg.data_contract(), opts.measure) for v in vols]
    return _Pass(np.concatenate(feats), np.concatenate(zs), np.asarray(values), kept)


def _generated_pass(cfg: Config, opts: EvaluateOptions, gen_model, net) -> _Pass:
    """``opts.n`` generated volumes (seeded latents, classes drawn as training did), a few kept for diversity."""
    import torch

    from hagan_clinic.sampling import sample_labels, sample_latent

    labels = sample_labels(opts.n, cfg.model.num_classes, None)
    feats: list[np.ndarray] = []
    zs: list[np.ndarray] = []
    values: list[float] = []
    kept: list[np.ndarray] = []
    for i in progress(range(0, opts.n, opts.batch_size), "generated", "batch"):
        idx = range(i, min(opts.n, i + opts.batch_size))
        z = torch.cat([sample_latent(opts.seed, k, cfg.model.latent_dim) for k in idx])
        y = None if labels[0] is None else torch.tensor([labels[k] for k in idx])
        with torch.no_grad():
            x = gen_model.generate(z, y, slab=opts.slab)
        feats.append(net.extract(x))
        vols = [v[0].float().cpu().numpy() for v in x]
        kept += vols[: max(0, opts.n_diversity - len(kept))]
        zs.append(z.numpy())
        values += [measure_volume(v, cfg.data_contract(), opts.measure) for v in vols]
    return _Pass(np.concatenate(feats), np.concatenate(zs), np.asarray(values), kept)


def _reconstruction(vols: list[np.ndarray], cfg: Config, rec_model, slab: int | None) -> dict:
    """Encode then generate each real volume: mean MAE (model range and HU), PSNR, SSIM, and how many."""
    import torch

    from hagan_clinic.metrics import mae, psnr, ssim_3d

    recon: dict[str, list[float]] = {"mae": [], "mae_hu": [], "psnr": [], "ssim": []}
    lo, hi = cfg.data.window
    classes: list[int | None] = [*range(cfg.model.num_classes)] or [None]
    for vol in vols:
        # a conditional model also needs the class, which a real volume does not carry: the best class is used
        candidates = []
        with torch.no_grad():
            z = rec_model.encode(torch.from_numpy(vol)[None, None])
            for c in classes:
                y = None if c is None else torch.tensor([c])
                candidates.append(rec_model.generate(z, y, slab=slab)[0, 0].float().cpu().numpy())
        x_hat = min(candidates, key=lambda c: mae(vol, c))
        recon["mae"].append(mae(vol, x_hat))
        recon["mae_hu"].append(mae(vol, x_hat) * (hi - lo) / 2)
        recon["psnr"].append(psnr(vol, x_hat))
        recon["ssim"].append(ssim_3d(vol, x_hat))
    return {k: float(np.mean(v)) for k, v in recon.items() if v} | {"n": len(recon["mae"])}


def _log(tracker, metrics: dict, opts: EvaluateOptions, out: Path) -> None:
    with tracker.run("evaluate", tags={"stage": "evaluate"}):
        described = {k: v for k, v in metrics.items() if k.startswith("feature_net")}  # the network's name, file, hash
        tracker.log_params({"checkpoint_sha256": metrics["checkpoint_sha256"], **described, "n_generated": opts.n,
                            "n_real": metrics["n_real"], "seed": opts.seed, "measure": opts.measure})  # fmt: skip
        flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
        flat.update({f"memorisation.{k}": float(v) for k, v in metrics["memorisation"].items()
                     if isinstance(v, (int, float))})  # fmt: skip
        flat.update({f"reconstruction.{k}": v for k, v in metrics["reconstruction"].items()})
        tracker.log_metrics({k: float(v) for k, v in flat.items() if v is not None and np.isfinite(v)})
        for name in OUTPUT_NAMES:  # what this run wrote, never other files in the folder
            if (out / name).is_file():
                tracker.log_artifact(out / name, "evaluate")


def run(opts: EvaluateOptions, tracker=None) -> EvaluateResult:
    """Evaluate the checkpoint against the real volumes; metrics.json and the figures in ``opts.out``."""
    from hagan_clinic.feature_nets import hagan_encoder, medicalnet
    from hagan_clinic.io.torch_files import file_sha256
    from hagan_clinic.metrics import frechet_distance, mmd2
    from hagan_clinic.models.hagan import load_checkpoint
    from hagan_clinic.plots import mid_slices_png
    from hagan_clinic.tracking import NullTracker

    tracker = tracker or NullTracker()
    if not opts.checkpoint.is_file():
        raise HaganError(f"checkpoint not found: {opts.checkpoint}")
    guard = Outputs("evaluate", [opts.checkpoint, opts.real if opts.real.is_file() else None], opts.overwrite)
    for name in OUTPUT_NAMES:  # before any work
        guard.check(opts.out / name)
    gen_model = load_checkpoint(opts.checkpoint, opts.device, ema=True)
    rec_model = load_checkpoint(opts.checkpoint, opts.device, ema=False, require=("EH", "EG"))  # trained with raw G
    cfg, sha = gen_model.config, file_sha256(opts.checkpoint)
    contract = cfg.data_contract()
    if contract["spacing_mm"] is None and opts.measure != "mean_hu":
        measure_volume(np.zeros((1, 1, 1), np.float32), contract, opts.measure)  # the one-line refusal, up front
    files, real_cache = real_volumes(opts.real, cfg)
    training = training_volumes(opts, cfg)  # before any work too: a cache made at other settings is refused
    net = hagan_encoder(rec_model, sha) if opts.feature_net == "encoder" else medicalnet(opts.feature_net, opts.device)
    out = make_folder(opts.out)
    real = _real_pass(files, cfg, opts, rec_model, net)
    gen = _generated_pass(cfg, opts, gen_model, net)
    metrics: dict = {"checkpoint_sha256": sha, **net.describe(), "n_generated": opts.n, "n_real": len(files)}
    metrics["fid"] = frechet_distance(gen.feats, real.feats)
    metrics["mmd2"] = mmd2(gen.feats, real.feats)
    metrics["ms_ssim_generated"] = _pairwise_ms_ssim(gen.kept)
    metrics["ms_ssim_real"] = _pairwise_ms_ssim(real.kept[: opts.n_diversity])
    metrics["memorisation"] = _memorisation(
        opts, cfg, net, rec_model, training, files, real_cache, real.feats, gen.feats
    )
    metrics["reconstruction"] = _reconstruction(real.kept[: opts.n_recon], cfg, rec_model, opts.slab)
    fits = {"generated": (gen.z, gen.values), "encoded real": (real.z, real.values)}
    metrics["latent_direction"] = _latent_direction(gen_model, fits, opts, contract, out)
    metrics["latent_direction"]["measure_computable"] = {
        "generated": int(np.isfinite(gen.values).sum()),
        "real": int(np.isfinite(real.values).sum()),
    }
    rows = [(f"generated {i}", v) for i, v in enumerate(gen.kept[:3])]
    rows += [(f"real {i}", v) for i, v in enumerate(real.kept[:3])]
    mid_slices_png(rows, out / "samples.png", "generated (top) and real (bottom)")
    for name in ("latent_direction.png", "samples.png"):
        if (out / name).is_file():
            guard.record(out / name)
    write_json(out / "metrics.json", metrics, guard, sort_keys=False, default=float)
    _log(tracker, metrics, opts, out)
    return EvaluateResult(metrics, opts.out)
