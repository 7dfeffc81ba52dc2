"""The ``hagan-clinic`` command group; the commands attach themselves to it (model.py, cohort.py, analysis.py)."""

from __future__ import annotations

import click

from .options import verbosity


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="hagan-clinic")
@verbosity
def cli() -> None:
    """HA-GAN for 3D CT and MRI cohorts: generate, encode, and import published weights.

    Start with `hagan-clinic demo`; every command has --help. Results go to stdout; progress bars and log lines
    to stderr (-q/--quiet: warnings and errors only).
    """
