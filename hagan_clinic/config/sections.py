"""The config's sections: typed, frozen pydantic models, one per concern, with every default, range and description.

Bounds are part of the type: a value outside its range is refused with a one-line :class:`ConfigError` naming the
key. The model geometry that follows from the config (feature-map size, slab depth, number of upsampling stages) is
derived here, once, so that no network carries a hidden constant.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import HaganError, short_repr

#: The whole volume is split into this many slabs along D (the axial axis): G^H is trained on one slab per
#: step and E^G reads the E^H outputs of all of them. It is part of the published architecture (D^H's strides
#: assume a slab of S/8 slices), not a tunable.
NUM_SLABS = 8

MAX_SEED = 2**32 - 1  # numpy's and sklearn's seeds are 32-bit
# The model grid's voxel spacing: finer than any clinical scan resamples a scan to billions of voxels; coarse grids
# are legitimate for small models (a whole-body scan on a 32^3 grid needs voxels of 50 mm and more).
MIN_SPACING_MM, MAX_SPACING_MM = 0.1, 100.0
MAX_STEPS = 10**8  # iterations, epochs and step intervals
MAX_WEIGHT = 1e4  # loss weights


class ConfigError(HaganError):
    """A configuration problem, with a one-line message that names the offending key or file."""


class _Section(BaseModel):
    # allow_inf_nan=False: every float of every section must be finite (.inf or .nan in YAML is refused)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Network geometry. Widths are the reference's names for them; everything else derives from these."""

    # the upper bounds keep a hostile or mistyped file from asking for a network no machine can hold; each is
    # many times the published model's value
    size: int = Field(default=256, description="output edge S of the cubic volume (voxels): a power of two, 32 to 1024")
    latent_dim: int = Field(default=1024, ge=1, le=65536, description="length of z (1 to 65536)")
    num_classes: int = Field(
        default=0, ge=0, le=10000, description="0 for unconditional; C > 0 adds a one-hot label to z"
    )
    g_width: int = Field(
        default=32, ge=2, le=512, description="generator base width c: trunk 16c..2c, G^H c.., G^L c, c/2"
    )
    d_high_width: int = Field(default=512, ge=64, le=8192, description="D^H widest layer (the reference's 512)")
    d_low_width: int = Field(default=256, ge=8, le=8192, description="D^L widest layer")
    e_ground_width: int = Field(default=256, ge=8, le=8192, description="E^G widest layer")
    norm_groups: int = Field(default=8, ge=1, le=512, description="GroupNorm groups in G and the encoders")
    high_stages: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="x2 upsampling stages in G^H; default 2, and 3 for 512^3 (feature map capped at 64^3)",
    )
    encode_mode: Literal["slabs", "whole"] = Field(
        default="slabs", description="E^H per slab (as E^G is trained) or over the whole volume at once"
    )

    @property
    def stages(self) -> int:
        if self.high_stages is not None:
            return self.high_stages
        return max(2, int(math.log2(self.size)) - 6)

    @property
    def upsample(self) -> int:
        """Ratio of output size to feature-map size (4 in the reference)."""
        return 2**self.stages

    @property
    def feature_size(self) -> int:
        """Edge F of G^A's feature map and of the low-resolution volume."""
        return self.size // self.upsample

    @property
    def feature_channels(self) -> int:
        return 2 * self.g_width

    @property
    def slab_depth(self) -> int:
        """Slices of one high-resolution slab (S/8)."""
        return self.size // NUM_SLABS

    @property
    def feature_slab_depth(self) -> int:
        return self.feature_size // NUM_SLABS

    @property
    def max_slab_start(self) -> int:
        """Largest slab start r in output slices; r / max_slab_start is D^H's position input (224 at 256^3)."""
        return self.size - self.slab_depth

    @property
    def trunk_upsamplings(self) -> int:
        return int(math.log2(self.feature_size // 4))

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"model.{key}: {msg}")

        need(
            32 <= self.size <= 1024 and _pow2(self.size),
            "size",
            f"must be a power of two from 32 to 1024, got {short_repr(self.size)}",
        )
        need(self.high_stages is None or self.high_stages >= 1, "high_stages", "must be >= 1")
        f = self.feature_size
        need(f >= 8 and self.size % self.upsample == 0, "high_stages", f"leaves a feature map of {f}^3 (< 8)")
        need(f <= 64, "high_stages", f"leaves a feature map of {f}^3; G^A reaches at most 64^3 (raise it)")
        need(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        g = self.norm_groups
        need(g >= 1, "norm_groups", "must be >= 1")
        # every GroupNorm in G (down to G^L's c/2 and G^H's last hidden stage) and in E must split evenly
        smallest_g = self.g_width // 2 ** max(1, self.stages - 2)
        need(
            self.g_width >= 2 and smallest_g >= 1 and smallest_g % g == 0,
            "g_width",
            f"{self.g_width} leaves layers of {smallest_g} channels, not divisible by norm_groups={g}",
        )
        need(
            self.e_ground_width % (8 * g) == 0,
            "e_ground_width",
            f"must be a multiple of 8 * norm_groups = {8 * g}",
        )
        need(self.d_high_width % 64 == 0, "d_high_width", "must be a multiple of 64")
        need(self.d_low_width % 8 == 0, "d_low_width", "must be a multiple of 8")
        return self


class DataConfig(_Section):
    """The data contract: how intensities and geometry map between the scanner's world and the model's."""

    modality: Literal["CT", "MR"] = Field(default="CT", description="CT (values in HU) or MR")
    window: tuple[float, float] = Field(
        default=(-1024.0, 600.0), description="intensity range mapped to [-1, 1] (HU for CT, normalised units for MR)"
    )
    spacing_mm: tuple[float, float, float] | None = Field(
        default=(1.5, 1.5, 1.5),
        description="voxel spacing (x, y, z) in mm of the model's grid, each 0.1 to 100; null: unknown (resize: "
        "reference only)",
    )
    resize: Literal["spacing", "reference"] = Field(
        default="spacing",
        description="spacing: body crop and resample to spacing_mm; reference: the reference implementation's "
        "preprocessing (drop blank axial slices, resize the whole scan to S^3), for imported weights",
    )
    dir: str | None = Field(
        default=None, description="training data folder (.npy in [-1, 1], or NIfTI in scanner units)"
    )
    table: str | None = Field(default=None, description="CSV listing the volumes (a path column) and optional labels")
    path_column: str = Field(default="path", description="column of `table` with file paths relative to `dir`")
    label_column: str | None = Field(default=None, description="column of `table` with integer class labels")
    # reading a cohort
    min_slices: int = Field(default=16, ge=2, le=10000, description="series with fewer slices are skipped")
    irregular: Literal["refuse", "resample"] = Field(
        default="refuse",
        description="missing slices, uneven spacing, gantry tilt: refuse, or resample and mark the series",
    )
    # preprocessing to the model's grid
    crop: Literal["body", "none"] = Field(
        default="body", description="crop to the body (largest object) before fitting"
    )
    body_threshold: float = Field(
        default=-500.0,
        ge=-2000,
        le=4000,
        description="CT: HU above which a voxel is body (for the crop), -2000 to 4000",
    )
    mr_percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5), description="MR: body-intensity percentiles mapped to the window's bounds"
    )
    cache_dtype: Literal["float16", "int16"] = Field(default="float16", description="dtype of cached volumes")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.window[0] < self.window[1]:
            raise ValueError(f"data.window: lower bound must be below upper, got {list(self.window)}")
        if self.spacing_mm is None:
            if self.resize != "reference":
                raise ValueError("data.spacing_mm: null (unknown) is allowed only with data.resize: reference")
        elif not all(math.isfinite(s) and MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in self.spacing_mm):
            bounds = f"{MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm"
            raise ValueError(f"data.spacing_mm: each must be {bounds}, got {list(self.spacing_mm)}")
        if not all(math.isfinite(w) and abs(w) <= 1e6 for w in self.window):
            raise ValueError(f"data.window: must be finite numbers within +-1e6, got {list(self.window)}")
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"data.mr_percentiles: need 0 <= low < high <= 100, got {[lo, hi]}")
        return self


class TrainConfig(_Section):
    """The training loop. Defaults are the reference's (Sun et al. 2022) except where it had a defect."""

    # bounds: finite, positive where a zero or negative value means nothing, and far above any real run
    iterations: int = Field(default=80000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(default=4, ge=1, le=4096, description="volumes per step and per process")
    lr_g: float = Field(default=1e-4, gt=0)
    lr_d: float = Field(default=4e-4, gt=0)
    lr_eh: float = Field(default=1e-4, gt=0)
    lr_eg: float = Field(default=1e-4, gt=0)
    betas: tuple[float, float] = Field(default=(0.0, 0.999), description="Adam's betas, each in [0, 1)")
    eps: float = Field(default=1e-8, gt=0, le=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast dtype; fp16 adds grad scaling"
    )
    channels_last: bool = Field(default=False, description="channels-last-3d memory format (helps on GPUs)")
    checkpoint_every: int = Field(
        default=1000, ge=1, le=MAX_STEPS, description="iterations between snapshots and states"
    )
    keep_last: int = Field(default=3, ge=1, le=1000, description="snapshots and states kept besides the final one")
    log_every: int = Field(
        default=50, ge=1, le=MAX_STEPS, description="iterations between metric logs and progress lines"
    )
    image_every: int = Field(
        default=1000, ge=0, le=MAX_STEPS, description="iterations between preview PNGs (0: at the end)"
    )
    d_loss: Literal["averaged", "separate"] = Field(
        default="averaged", description="averaged: one BCE on the mean of the D^H and D^L logits (reference)"
    )
    d_high_weight: float = Field(
        default=1.0, ge=0, le=MAX_WEIGHT, description="weight of D^H's BCE when d_loss is separate"
    )
    d_low_weight: float = Field(
        default=1.0, ge=0, le=MAX_WEIGHT, description="weight of D^L's BCE when d_loss is separate"
    )
    class_weight_g: float = Field(
        default=0.1, ge=0, le=MAX_WEIGHT, description="weight of G's class loss (conditional)"
    )
    encoder_weight: float = Field(default=1.0, ge=0, le=MAX_WEIGHT, description="weight of the E^H / E^G L1 losses")
    r1_gamma: float = Field(
        default=0.0, ge=0, le=MAX_WEIGHT, description="R1 penalty weight on D's real inputs (0 = off)"
    )
    ema: bool = Field(default=False, description="keep an exponential moving average of G for sampling")
    ema_decay: float = Field(default=0.999, gt=0, lt=1)
    low_res: Literal["area", "nearest"] = Field(
        default="area",
        description="how x_low is made from x: area = antialiased mean (nearest: the reference's aliasing)",
    )
    max_nonfinite: int = Field(
        default=10, ge=1, le=MAX_STEPS, description="abort after this many iterations in a row with a non-finite loss"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas: each must be in [0, 1), got {list(self.betas)}")
        return self


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(default=None, description="MLflow store; default sqlite:///<cwd>/mlruns/mlflow.db")
    experiment: str = "hagan-clinic"
    register_model: str | None = Field(
        default="hagan-clinic", description="registered model name (null: do not register)"
    )


ARMS = ("real", "real+synthetic", "real+classical", "real+synthetic+classical")


class ClassicalConfig(_Section):
    """Classical augmentation (MONAI random transforms), drawn afresh for every training volume and epoch."""

    flip_lr: bool = Field(default=False, description="left-right flips (off: in a thorax the heart is on the left)")
    rotate_deg: float = Field(default=5.0, ge=0, le=45, description="random rotation about each axis, up to +- degrees")
    scale: float = Field(default=0.05, ge=0, lt=0.5, description="random zoom, up to +- this fraction per axis")
    translate_vox: float = Field(default=2.0, ge=0, le=32, description="random shift, up to +- voxels per axis")
    elastic: bool = Field(default=False, description="add a random elastic deformation (slower)")
    elastic_sigma: tuple[float, float] = Field(default=(5.0, 7.0), description="elastic smoothing range (voxels)")
    elastic_magnitude: tuple[float, float] = Field(default=(20.0, 40.0), description="elastic displacement range")
    intensity_scale: float = Field(
        default=0.1, ge=0, lt=1, description="random intensity scaling, up to +- this fraction"
    )
    intensity_shift: float = Field(
        default=0.05, ge=0, lt=1, description="random intensity offset, up to +- (model units)"
    )
    noise_sd: float = Field(default=0.02, ge=0, lt=1, description="Gaussian noise sd (model units)")

    @model_validator(mode="after")
    def _check(self) -> ClassicalConfig:
        for key, top in (("elastic_sigma", 50.0), ("elastic_magnitude", 500.0)):
            lo, hi = getattr(self, key)
            if not 0 <= lo <= hi <= top:
                raise ValueError(f"augment.classical.{key}: need 0 <= low <= high <= {top:g}, got {[lo, hi]}")
        return self


class AugmentConfig(_Section):
    """A downstream classifier trained on real volumes, with and without synthetic and classical augmentation."""

    cache: str | None = Field(default=None, description="preprocess cache of the real volumes (manifest.csv inside)")
    clinical: str | None = Field(default=None, description="table with the ID column and the label column")
    id_column: str = "patient_id"
    label_column: str = "label"
    checkpoint: str | None = Field(default=None, description="conditional HA-GAN checkpoint for the synthetic volumes")
    arms: tuple[str, ...] = Field(default=("real", "real+synthetic", "real+classical"), description=f"any of {ARMS}")
    synthetic_ratio: float = Field(
        default=1.0, gt=0, le=100, description="synthetic volumes per real training volume, per class"
    )
    seeds: tuple[Annotated[int, Field(ge=0, le=MAX_SEED)], ...] = Field(
        default=(0, 1, 2), min_length=1, max_length=1000, description="classifier seeds per arm (the split is fixed)"
    )
    split_seed: int = Field(default=0, ge=0, le=MAX_SEED)
    val_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    classifier: Literal["resnet10", "resnet18", "densenet121"] = "resnet10"
    downsample: int = Field(
        default=1, ge=1, le=64, description="classifier input: volumes block-averaged by this factor per axis"
    )
    epochs: int = Field(default=10, ge=1, le=MAX_STEPS)
    batch_size: int = Field(default=8, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0)
    classical: ClassicalConfig = Field(default_factory=ClassicalConfig)
    bootstrap: int = Field(default=1000, ge=100, le=100000, description="patient-bootstrap resamples of the test split")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"augment.arms: unknown arm '{unknown[0]}' (choose from {', '.join(ARMS)})")
        if "real" not in self.arms:
            raise ValueError("augment.arms: the 'real' arm is the reference of every comparison; keep it")
        return self


class EncodeConfig(_Section):
    """``hagan-clinic encode``: how series are read and encoded (the flags of the same names override these)."""

    batch_size: int = Field(default=2, ge=1, le=4096, description="volumes per forward pass of E^H and E^G")
    workers: int | None = Field(
        default=None, ge=0, le=256, description="reader processes (0: read in the main process); null: the default rule"
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="dtype of the encoders' weights and arithmetic (cast once; no autocast)"
    )


class RegressConfig(_Section):
    """``hagan-clinic regress``: what is regressed on the features, and how it is cross-validated."""

    targets: tuple[str, ...] = Field(
        default=("fev1pp", "fev1_fvc", "pct_emphysema"), min_length=1, description="clinical columns regressed"
    )
    log_targets: tuple[str, ...] = Field(
        default=(), description="targets regressed on the log scale (as the paper did)"
    )
    id_column: str = Field(default="patient_id", description="column joining the feature and clinical tables")
    gold_column: str | None = Field(default=None, description="GOLD stage column (0-4); null: 'gold' when present")
    feature_regex: str = Field(default=r"z\d+", description="names of the feature columns (a regular expression)")
    folds: int = Field(default=5, ge=2, le=1000, description="outer cross-validation folds, by patient")

    @model_validator(mode="after")
    def _check(self) -> RegressConfig:
        unknown = [t for t in self.log_targets if t not in self.targets]
        if unknown:
            raise ValueError(f"regress.log_targets: '{unknown[0]}' is not one of regress.targets")
        return self


class EvaluateConfig(_Section):
    """``hagan-clinic evaluate``: how many volumes are generated and what they are compared with."""

    n: int = Field(default=512, ge=2, le=10**6, description="volumes generated (compared with every real volume)")
    feature_net: str = Field(
        default="encoder",
        description="'encoder' (the model's own) or a local MedicalNet weights file (resnet_10.pth ...)",
    )
    measure: Literal["laa950_pct", "lung_volume_ml", "mean_hu"] = Field(
        default="laa950_pct", description="what the latent direction should move"
    )
    batch_size: int = Field(default=4, ge=1, le=4096, description="volumes per generator or feature-net pass")
    slab: int | None = Field(
        default=None, ge=1, le=1024, description="generate this many feature slices at a time (null: whole)"
    )


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
