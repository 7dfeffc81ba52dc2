"""The flags the commands share. Each means the same wherever it appears, with one help text:

``--out`` (what the command writes), ``-n/--n`` (how many), ``--device`` (where torch computes), ``--config`` and
``--set`` (settings; flags of the same meaning override the config), ``--workers`` (one default rule,
:func:`default_workers`), ``--format csv|parquet`` (tables), ``--seed``, ``--overwrite``,
``--tracking-uri``/``--experiment``/``--no-tracking`` (one switchboard: :func:`hagan_clinic.tracking.choose`), and
``--quiet``/``--verbose`` (accepted by the group and by every command).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ..devices import DEVICE_HELP

F = TypeVar("F", bound=Callable[..., Any])

SET_HELP = "Override a config value, e.g. --set model.size=128 (repeatable)."
OVERWRITE_HELP = "Replace existing output files that this command did not write (never needed to re-run it)."
WORKERS_HELP = "Worker processes (0: none, work in this process). Default: 0 on 1-2 cores, else half the cores (max 4)."
FORMAT_HELP = "Table format. Default: from the --out name"  # each command adds what a name without one means
#: Every --seed: numpy, torch and sklearn all take 32-bit seeds (the same bound as the config's seed).
SEED = click.IntRange(0, 2**32 - 1)


def default_workers(cores: int | None = None) -> int:
    """The one default of every ``--workers``: none on one or two cores (a worker process would compete with the
    main process instead of overlapping it), else half the cores, at most four (reading is I/O-bound beyond)."""
    from ..devices import usable_cores

    cores = cores if cores is not None else usable_cores()
    return 0 if cores <= 2 else min(4, cores // 2)


def workers_or_default(workers: int | None) -> int:
    return default_workers() if workers is None else workers


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # a flag not given leaves what the group (or main) set
        from ..io.logs import configure

        chosen = ctx.find_root().meta.setdefault("hagan_clinic.verbosity", param.name)
        if chosen != param.name:  # on the group and the command alike
            raise click.UsageError("--quiet and --verbose contradict each other: give one")
        configure(-1 if param.name == "quiet" else 1)


def verbosity(f: F) -> F:
    """``-q/--quiet`` (warnings only, no progress bars) and ``-v/--verbose`` (debug lines); stdout keeps results."""
    f = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_verbosity,
                     help="More log lines on stderr (debug).")(f)  # fmt: skip
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity,
                        help="No progress bars or info lines on stderr; warnings and errors only.")(f)  # fmt: skip


def out_option(help: str, folder: bool, required: bool = True, default: str | None = None) -> Callable[[F], F]:
    kind = click.Path(file_okay=False) if folder else click.Path(dir_okay=False)
    return click.option("--out", required=required, default=default, type=kind, help=help,
                        show_default=default is not None)  # fmt: skip


def count_option(default: int | None, minimum: int, what: str, config_key: str = "") -> Callable[[F], F]:
    """``-n/--n``: a count with its own default, or (``default`` None) the config's ``config_key``."""
    hint = "" if default is not None else f" Default: the config's {config_key}."
    return click.option("-n", "--n", "n", type=click.IntRange(min=minimum), default=default,
                        show_default=default is not None, help=f"{what}.{hint}")  # fmt: skip


def device_option(from_config: bool) -> Callable[[F], F]:
    if from_config:
        return click.option("--device", default=None, help=f"{DEVICE_HELP} Default: the config's device.")
    return click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)


def workers_option(f: F) -> F:
    return click.option("--workers", type=click.IntRange(min=0), default=None, help=WORKERS_HELP)(f)


def format_option(default: str | None) -> Callable[[F], F]:
    """``--format csv|parquet``; ``default``: the format of an --out name without a suffix (the one rule is
    :func:`hagan_clinic.io.files.table_format`)."""
    tail = (
        f"{default} for a name without a suffix; any other suffix needs --format"
        if default
        else "name it .csv or .parquet, or give --format"
    )
    return click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default=None,
                        help=f"{FORMAT_HELP} ({tail}).")  # fmt: skip


def config_options(default: str | None, what: str) -> Callable[[F], F]:
    """``--config`` (a path or a shipped config's name) and ``--set``; ``default`` None makes --config required."""

    def apply(f: F) -> F:
        f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(f)
        help = f"Config: a path, or a shipped config's name (base, tiny, demo, ...): {what}."
        option = click.option("--config", "config_file", required=default is None, default=default, help=help,
                              show_default=default is not None)  # fmt: skip
        return option(f)

    return apply


def seed_option(from_config: bool, help: str = "Same seed, same result.") -> Callable[[F], F]:
    if from_config:
        return click.option("--seed", type=SEED, default=None, help=f"{help} Default: the config's seed.")
    return click.option("--seed", type=SEED, default=0, show_default=True, help=help)


overwrite_option = click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)


@dataclass(frozen=True)
class TrackingFlags:
    """``--tracking-uri``, ``--experiment`` and ``--no-tracking`` as given (None: not given)."""

    uri: str | None = None
    experiment: str | None = None
    off: bool = False

    def choice(self, section: Any = None, root: str | Path = "."):
        """The switchboard's decision with the config's tracking ``section`` (None: the defaults)."""
        from ..tracking import choose

        return choose(section, self.uri, self.experiment, self.off, root)

    def tracker(self, section: Any = None, root: str | Path = "."):
        """A lazy Tracker (nothing is created before its first run), or a NullTracker when tracking is off; the
        setting is checked first (a usable, writable store; an experiment name), so a bad one costs no work."""
        return self.choice(section, root).checked().tracker()

    def store(self, section: Any = None) -> str:
        """The store a command that only reads (models:/ and runs:/ URIs) reads from: checked, never created."""
        from ..tracking import check_uri

        return check_uri(self.choice(section).uri)


TRACKING_URI_HELP = (
    "MLflow store (e.g. sqlite:///DIR/mlflow.db, http://host:5000). Default: the config's tracking.uri, else "
    "MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db."
)
#: ``--tracking-uri`` alone: for commands that only read the store (models:/ and runs:/ URIs), never log.
tracking_uri_option = click.option("--tracking-uri", default=None, metavar="URI", help=TRACKING_URI_HELP)


def tracking_options(f: F) -> F:
    """``--tracking-uri``, ``--experiment``, ``--no-tracking``: handed to the command as one ``tracking``
    argument (a :class:`TrackingFlags`)."""

    @functools.wraps(f)
    def command(*args: Any, tracking_uri: str | None, experiment: str | None, no_tracking: bool, **kwargs: Any) -> Any:
        return f(*args, tracking=TrackingFlags(tracking_uri, experiment, no_tracking), **kwargs)

    command = click.option("--no-tracking", is_flag=True, help="Do not log to MLflow (the config's tracking.enabled: "
                           "false does the same).")(command)  # fmt: skip
    command = click.option("--experiment", default=None, metavar="NAME",
                           help="MLflow experiment. Default: the config's tracking.experiment.")(command)  # fmt: skip
    command = tracking_uri_option(command)
    return command  # type: ignore[return-value]


def invocation() -> list[str]:
    """The arguments this command line was given (after the program's name), for provenance records."""
    ctx = click.get_current_context()
    obj = ctx.find_root().obj
    args = list(obj.get("argv", [])) if isinstance(obj, dict) else []
    return args[args.index(ctx.info_name) :] if ctx.info_name in args else args


CHECKPOINT_HELP = "Model file, or a registered model: models:/NAME/VERSION or models:/NAME@ALIAS."


def checkpoint_source(
    text: str, tracking: TrackingFlags | None = None, section: Any = None, role: str = "encoder"
) -> tuple[Path, str | None]:
    """A checkpoint argument as a local file and, for a registered model (``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``, looked up in the store of ``--tracking-uri``/the config/the environment), the
    ``NAME/VERSION`` of the served model of ``role`` (encoder or generator) that the command uses: encode records the
    encoder's version even when given the generator's URI, and the other way round."""
    if not text.startswith("models:/"):
        return Path(text), None
    from ..tracking.registry import resolve_checkpoint

    found = resolve_checkpoint(text, (tracking or TrackingFlags()).store(section))
    return found.path, found.as_used_by(role)


def load(config_file: str, overrides: tuple[str, ...], only: tuple[str, ...] | None = None):
    """The config of ``--config`` with ``--set`` applied (looked up at call time: tests replace it).

    ``only``: the keys that mean something to a command whose model and data contract come from its checkpoint
    (encode, evaluate): a ``--set`` of any other key would be silently ignored, so it is refused."""
    from .. import config

    for item in overrides if only is not None else ():
        key = item.partition("=")[0].strip()
        if only is not None and key and key.split(".")[0] not in only:  # no key: load_config says what is wrong
            raise click.UsageError(
                f"--set {key[:80]}: this command takes the model and the data contract from its checkpoint; "
                f"it uses only {', '.join(k if k in ('seed', 'device') else k + '.*' for k in only)}"
            )
    return config.load_config(config_file, overrides)
