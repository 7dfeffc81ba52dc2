"""Typed, frozen configuration loaded from YAML.

A config file may name a parent with ``extends: other.yaml`` (resolved relative to the file); the child's keys
are merged over the parent's, section by section. ``--set section.key=value`` overrides are applied last, their
values parsed as YAML (so ``model.size=128`` is an int and ``data.window=[-1000,400]`` a list). Unknown keys and
wrong types are rejected with a :class:`ConfigError` whose one-line message names the key.

The model geometry that follows from the config (feature-map size, slab depth, number of upsampling stages) is
derived here, once, so that no network carries a hidden constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import HaganError, one_line, short_repr

#: The shipped configs (package data): ``load_config("tiny")`` finds them from any working folder.
CONFIG_DIR = Path(str(resources.files("hagan_clinic").joinpath("configs")))

#: The whole volume is split into this many slabs along D (the axial axis): G^H is trained on one slab per
#: step and E^G reads the E^H outputs of all of them. It is part of the published architecture (D^H's strides
#: assume a slab of S/8 slices), not a tunable.
NUM_SLABS = 8

#: Bounds on what reading a config may cost. A small YAML file can expand through aliases to gigabytes (the
#: "billion laughs"), so the composed node graph is measured before anything is built from it.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_EXTENDS_DEPTH = 16
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
    size: int = Field(256, description="output edge S of the cubic volume (voxels): a power of two, 32 to 1024")
    latent_dim: int = Field(1024, ge=1, le=65536, description="length of z (1 to 65536)")
    num_classes: int = Field(0, ge=0, le=10000, description="0 for unconditional; C > 0 adds a one-hot label to z")
    g_width: int = Field(32, ge=2, le=512, description="generator base width c: trunk 16c..2c, G^H c.., G^L c, c/2")
    d_high_width: int = Field(512, ge=64, le=8192, description="D^H widest layer (the reference's 512)")
    d_low_width: int = Field(256, ge=8, le=8192, description="D^L widest layer")
    e_ground_width: int = Field(256, ge=8, le=8192, description="E^G widest layer")
    norm_groups: int = Field(8, ge=1, le=512, description="GroupNorm groups in G and the encoders")
    high_stages: int | None = Field(
        None,
        ge=1,
        le=8,
        description="x2 upsampling stages in G^H; default 2, and 3 for 512^3 (feature map capped at 64^3)",
    )
    encode_mode: Literal["slabs", "whole"] = Field(
        "slabs", description="E^H per slab (as E^G is trained) or over the whole volume at once"
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

    modality: Literal["CT", "MR"] = "CT"
    window: tuple[float, float] = Field(
        (-1024.0, 600.0), description="intensity range mapped to [-1, 1] (HU for CT, normalised units for MR)"
    )
    spacing_mm: tuple[float, float, float] | None = Field(
        (1.5, 1.5, 1.5),
        description="voxel spacing (x, y, z) in mm of the model's grid, each 0.1 to 20; null: unknown (resize: "
        "reference only)",
    )
    resize: Literal["spacing", "reference"] = Field(
        "spacing",
        description="spacing: body crop and resample to spacing_mm; reference: the reference implementation's "
        "preprocessing (drop blank axial slices, resize the whole scan to S^3), for imported weights",
    )
    dir: str | None = Field(None, description="training data folder (.npy in [-1, 1], or NIfTI in scanner units)")
    table: str | None = Field(None, description="CSV listing the volumes (a path column) and optional labels")
    path_column: str = Field("path", description="column of `table` with file paths relative to `dir`")
    label_column: str | None = Field(None, description="column of `table` with integer class labels")
    # reading a cohort
    min_slices: int = Field(16, ge=2, le=10000, description="series with fewer slices are skipped")
    irregular: Literal["refuse", "resample"] = Field(
        "refuse", description="missing slices, uneven spacing, gantry tilt: refuse, or resample and mark the series"
    )
    # preprocessing to the model's grid
    crop: Literal["body", "none"] = Field("body", description="crop to the body (largest object) before fitting")
    body_threshold: float = Field(
        -500.0, ge=-2000, le=4000, description="CT: HU above which a voxel is body (for the crop), -2000 to 4000"
    )
    mr_percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="MR: body-intensity percentiles mapped to the window's bounds"
    )
    cache_dtype: Literal["float16", "int16"] = Field("float16", description="dtype of cached volumes")

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
    iterations: int = Field(80000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(4, ge=1, le=4096, description="volumes per step and per process")
    lr_g: float = Field(1e-4, gt=0)
    lr_d: float = Field(4e-4, gt=0)
    lr_eh: float = Field(1e-4, gt=0)
    lr_eg: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = Field((0.0, 0.999), description="Adam's betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, le=1)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype; fp16 adds grad scaling")
    channels_last: bool = Field(False, description="channels-last-3d memory format (helps on GPUs)")
    checkpoint_every: int = Field(1000, ge=1, le=MAX_STEPS, description="iterations between snapshots and states")
    keep_last: int = Field(3, ge=1, le=1000, description="snapshots and states kept besides the final one")
    log_every: int = Field(50, ge=1, le=MAX_STEPS, description="iterations between metric logs and progress lines")
    image_every: int = Field(1000, ge=0, le=MAX_STEPS, description="iterations between preview PNGs (0: at the end)")
    d_loss: Literal["averaged", "separate"] = Field(
        "averaged", description="averaged: one BCE on the mean of the D^H and D^L logits (reference)"
    )
    d_high_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of D^H's BCE when d_loss is separate")
    d_low_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of D^L's BCE when d_loss is separate")
    class_weight_g: float = Field(0.1, ge=0, le=MAX_WEIGHT, description="weight of G's class loss (conditional)")
    encoder_weight: float = Field(1.0, ge=0, le=MAX_WEIGHT, description="weight of the E^H / E^G L1 losses")
    r1_gamma: float = Field(0.0, ge=0, le=MAX_WEIGHT, description="R1 penalty weight on D's real inputs (0 = off)")
    ema: bool = Field(False, description="keep an exponential moving average of G for sampling")
    ema_decay: float = Field(0.999, gt=0, lt=1)
    low_res: Literal["area", "nearest"] = Field(
        "area", description="how x_low is made from x: area = antialiased mean (nearest: the reference's aliasing)"
    )
    max_nonfinite: int = Field(
        10, ge=1, le=MAX_STEPS, description="abort after this many iterations in a row with a non-finite loss"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas: each must be in [0, 1), got {list(self.betas)}")
        return self


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(None, description="MLflow store; default sqlite:///<cwd>/mlruns/mlflow.db")
    experiment: str = "hagan-clinic"
    register_model: str | None = Field("hagan-clinic", description="registered model name (null: do not register)")


ARMS = ("real", "real+synthetic", "real+classical", "real+synthetic+classical")


class ClassicalConfig(_Section):
    """Classical augmentation (MONAI random transforms), drawn afresh for every training volume and epoch."""

    flip_lr: bool = Field(False, description="left-right flips (off: in a thorax the heart is on the left)")
    rotate_deg: float = Field(5.0, ge=0, le=45, description="random rotation about each axis, up to +- degrees")
    scale: float = Field(0.05, ge=0, lt=0.5, description="random zoom, up to +- this fraction per axis")
    translate_vox: float = Field(2.0, ge=0, le=32, description="random shift, up to +- voxels per axis")
    elastic: bool = Field(False, description="add a random elastic deformation (slower)")
    elastic_sigma: tuple[float, float] = Field((5.0, 7.0), description="elastic smoothing range (voxels)")
    elastic_magnitude: tuple[float, float] = Field((20.0, 40.0), description="elastic displacement range")
    intensity_scale: float = Field(0.1, ge=0, lt=1, description="random intensity scaling, up to +- this fraction")
    intensity_shift: float = Field(0.05, ge=0, lt=1, description="random intensity offset, up to +- (model units)")
    noise_sd: float = Field(0.02, ge=0, lt=1, description="Gaussian noise sd (model units)")

    @model_validator(mode="after")
    def _check(self) -> ClassicalConfig:
        for key, top in (("elastic_sigma", 50.0), ("elastic_magnitude", 500.0)):
            lo, hi = getattr(self, key)
            if not 0 <= lo <= hi <= top:
                raise ValueError(f"augment.classical.{key}: need 0 <= low <= high <= {top:g}, got {[lo, hi]}")
        return self


class AugmentConfig(_Section):
    """A downstream classifier trained on real volumes, with and without synthetic and classical augmentation."""

    cache: str | None = Field(None, description="preprocess cache of the real volumes (manifest.csv inside)")
    clinical: str | None = Field(None, description="table with the ID column and the label column")
    id_column: str = "patient_id"
    label_column: str = "label"
    checkpoint: str | None = Field(None, description="conditional HA-GAN checkpoint for the synthetic volumes")
    arms: tuple[str, ...] = Field(("real", "real+synthetic", "real+classical"), description=f"any of {ARMS}")
    synthetic_ratio: float = Field(
        1.0, gt=0, le=100, description="synthetic volumes per real training volume, per class"
    )
    seeds: tuple[Annotated[int, Field(ge=0, le=MAX_SEED)], ...] = Field(
        (0, 1, 2), min_length=1, max_length=1000, description="classifier seeds per arm (the split is fixed)"
    )
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    classifier: Literal["resnet10", "resnet18", "densenet121"] = "resnet10"
    downsample: int = Field(
        1, ge=1, le=64, description="classifier input: volumes block-averaged by this factor per axis"
    )
    epochs: int = Field(10, ge=1, le=MAX_STEPS)
    batch_size: int = Field(8, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0)
    classical: ClassicalConfig = Field(default_factory=ClassicalConfig)
    bootstrap: int = Field(1000, ge=100, le=100000, description="patient-bootstrap resamples of the test split")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"augment.arms: unknown arm '{unknown[0]}' (choose from {', '.join(ARMS)})")
        if "real" not in self.arms:
            raise ValueError("augment.arms: the 'real' arm is the reference of every comparison; keep it")
        return self


class Config(_Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def data_contract(self) -> dict[str, Any]:
        """What a consumer of generated or encoded volumes needs to map them back to HU and millimetres."""
        return {
            "modality": self.data.modality,
            "window": list(self.data.window),
            "spacing_mm": None if self.data.spacing_mm is None else list(self.data.spacing_mm),
            "size": self.model.size,
            "resize": self.data.resize,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(f"{source}: {_first_error(err)}") from None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _first_error(err: ValidationError) -> str:
    e = err.errors(include_url=False)[0]
    key = one_line(".".join(str(p) for p in e["loc"]), 80)  # a hostile file's key can be megabytes long
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if e["type"] == "value_error":
        # our validators already name the key in their message
        return msg.removeprefix("Value error, ")
    return f"{key}: {msg} (got {short_repr(e.get('input'))})" if key else msg


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or a bare name ('tiny') looked up among the shipped configs (package data)."""
    try:
        p = Path(path)
        for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
            if cand.is_file():
                return cand
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte
        pass
    raise ConfigError(f"config file not found: {short_repr(str(path), 120)}")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the cost of aliases bounded.

    An alias makes the composed node graph share a node instead of copying it, so a few hundred bytes can stand for
    billions of values that only blow up later (validation, error messages, dumping). Before anything is
    constructed, the values the document stands for are counted with aliases expanded (each shared node is counted
    once per use, at the cost of one visit) and a document over MAX_YAML_VALUES is refused.
    """

    aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
        return super().compose_node(parent, index)

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            if self.aliases:
                raise ConfigError(f"too many YAML aliases: they expand to over {MAX_YAML_VALUES} values (the limit)")
            raise ConfigError(f"too many YAML values: over {MAX_YAML_VALUES} (the limit)")
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values under ``node`` with every alias expanded, counted up to just past MAX_YAML_VALUES (the walk stops
    there); raises ConfigError on an alias inside the node it names (a cycle)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError("a YAML alias refers to a node that contains it")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, open_nodes)
        if size > MAX_YAML_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = size
    return size


def _parse_yaml(text: str) -> Any:
    """YAML text to Python values through :class:`_BoundedLoader`; raises yaml.YAMLError on bad syntax and
    ConfigError (without a source) on a document too large, too deep or with numbers too long to read."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: plain data only, never objects
    except RecursionError:
        raise ConfigError("YAML nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"a YAML value cannot be read ({one_line(err, 80)})") from None


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path.name}: cannot read ({err.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path.name}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file is a few kB of text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ConfigError(f"{path.name}: not a text YAML file")
    return text


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path.name}: 'extends' loops back to itself")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise ConfigError(f"{path.name}: more than {MAX_EXTENDS_DEPTH} files in one chain of 'extends'")
    text = _read_text(path)
    try:
        data = _parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path.name}: not valid YAML ({one_line(str(err).splitlines()[0], 120)})") from None
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping of sections")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path.name}: extends must be a config file name, got {short_repr(parent)}")
    try:
        parent_path = path.parent / parent  # an absolute name replaces the folder
        found = parent_path.is_file()
    except (OSError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{path.name}: extends {short_repr(parent)}, which is not a file")
    return _deep_merge(_read_yaml(parent_path, (*seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {short_repr(item)}: expected section.key=value")
        try:
            value = _parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        except ConfigError as err:
            raise ConfigError(f"--set {one_line(key, 80)}: {err}") from None
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {one_line(key, 80)}: '{'.'.join(parents[: i + 1])}' is not a section")
            node = child
        node[leaf] = value
    return data


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config (following ``extends``), apply ``--set`` overrides, validate.

    Raises ConfigError with a one-line message naming the key on any problem.
    """
    p = resolve_path(path)
    data = apply_overrides(_read_yaml(p), overrides)
    return Config.from_dict(data, source=p.name)
