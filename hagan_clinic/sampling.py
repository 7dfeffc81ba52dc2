"""Reproducible sampling of latent vectors and writing generated volumes to NIfTI (``hagan-clinic generate``)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import HaganError
from .io.files import Outputs, make_folder
from .io.nifti import from_model_range, write_array
from .models.hagan import HAGAN


def sample_latent(seed: int, index: int, latent_dim: int) -> torch.Tensor:
    """z ~ N(0, I) for sample ``index`` of a run seeded with ``seed``: (1, latent_dim) float32.

    Each sample has its own generator, so sample i is the same whatever the number of samples asked for.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(1, latent_dim, generator=gen)


def sample_labels(n: int, num_classes: int, label: int | None) -> list[int | None]:
    """The label of each sample: ``label`` for all, or classes in turn for a conditional model without one."""
    if num_classes == 0:
        return [None] * n
    if label is not None:
        return [label] * n
    return [i % num_classes for i in range(n)]


def generate_to_nifti(
    model: HAGAN,
    n: int,
    out_dir: str | Path,
    seed: int = 0,
    label: int | None = None,
    slab: int | None = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
    guard: Outputs | None = None,
    model_id: str = "",
) -> list[Path]:
    """Generate ``n`` volumes and write them as NIfTI in scanner units (HU for CT) with the contract's spacing.

    The files follow the project's one array convention (io.nifti): the model's (D, H, W) array is LPS, the affine
    says so, and the grid is centred on the origin ('aligned': a generated volume has no scanner position). A
    model whose grid has no defined spacing (``data.resize: reference``) gets nominal 1 mm voxels, and the file's
    description says that the spacing is unknown. Each file's description names its model (``model_id``, e.g. the
    start of the checkpoint's SHA-256) before its seed and index, so the 79 bytes a NIfTI header holds keep it. Also
    writes ``samples.csv`` (file, index, seed, label, model).
    ``guard`` checks each file before any volume is made: files of an earlier run of this command are replaced,
    others only with ``overwrite``.
    """
    cfg = model.config
    if cfg.model.num_classes == 0 and label is not None:
        raise ValueError("this checkpoint is unconditional: --label applies only to conditional models")
    if label is not None and not 0 <= label < cfg.model.num_classes:
        raise ValueError(f"--label must lie in [0, {cfg.model.num_classes - 1}], got {label}")
    out_dir = Path(out_dir)
    make_folder(out_dir)
    window, spacing = cfg.data.window, cfg.data.spacing_mm
    spacing_note = ""
    if spacing is None:
        spacing, spacing_note = (1.0, 1.0, 1.0), " spacing unknown (1 mm nominal);"
    dtype = np.int16 if cfg.data.modality == "CT" else np.float32
    labels = sample_labels(n, cfg.model.num_classes, label)
    names = [f"sample_{i:04d}" + ("" if labels[i] is None else f"_label{labels[i]}") + ".nii.gz" for i in range(n)]
    guard = guard or Outputs("generate")
    for name in [*names, "samples.csv"]:  # before the first volume: a refusal costs nothing
        guard.check(out_dir / name)
    rows, paths = [], []
    for i in progress(range(n)):
        z = sample_latent(seed, i, cfg.model.latent_dim)
        lab = None if labels[i] is None else torch.tensor([labels[i]])
        volume = model.generate(z, lab, slab=slab)[0, 0].float().cpu().numpy()
        name = names[i]
        made_by = f"hagan-clinic model={model_id};" if model_id else "hagan-clinic"
        desc = f"{made_by}{spacing_note} seed={seed} index={i}" + ("" if labels[i] is None else f" label={labels[i]}")
        hu = from_model_range(volume, window)
        paths.append(write_array(out_dir / name, hu, spacing, None, dtype, desc))
        guard.record(paths[-1])
        rows.append({"file": name, "index": i, "seed": seed, "label": "" if labels[i] is None else labels[i],
                     "model": model_id})  # fmt: skip
    with guard.target(out_dir / "samples.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "index", "seed", "label", "model"])
        writer.writeheader()
        writer.writerows(rows)
    return paths


@dataclass
class GenerateResult:
    """The volumes ``generate`` wrote (with samples.csv beside them in ``out``)."""

    paths: list[Path]
    out: Path
    checkpoint_sha256: str = ""
    model_id: str = ""

    def summary(self) -> str:
        return f"wrote {len(self.paths)} volume(s) to {self.out}"


def generate(
    checkpoint: str | Path,
    n: int,
    out: str | Path,
    seed: int = 0,
    label: int | None = None,
    slab: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    model_version: str | None = None,
) -> GenerateResult:
    """Load ``checkpoint`` on ``device`` (cpu, cuda, cuda:N or auto) and write ``n`` volumes to the folder ``out``
    with :func:`generate_to_nifti`; a bad ``label`` is a HaganError (one line). The files name their model by
    the first 12 hex digits of the checkpoint's SHA-256, and by ``model_version`` (registry NAME/VERSION) if
    given."""
    from .devices import resolve_device
    from .io.files import file_sha256
    from .io.logs import progress
    from .models.hagan import load_checkpoint

    model = load_checkpoint(checkpoint, device=str(resolve_device(device)))
    sha = file_sha256(checkpoint)
    model_id = f"{model_version} {sha[:12]}" if model_version else sha[:12]
    guard = Outputs("generate", [checkpoint], overwrite)
    try:
        paths = generate_to_nifti(
            model, n, out, seed=seed, label=label, slab=slab, guard=guard,
            progress=lambda steps: progress(steps, "generate", "vol"), model_id=model_id,
        )  # fmt: skip
    except ValueError as err:
        raise HaganError(str(err)) from None
    return GenerateResult(paths, Path(out), sha, model_id)
