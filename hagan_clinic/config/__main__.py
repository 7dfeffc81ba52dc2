"""``python -m hagan_clinic.config [--markdown] [SECTION ...]``: the config's keys, defaults and meanings."""

import argparse

from .keys import README_SECTIONS, _cell, config_keys, markdown_table

parser = argparse.ArgumentParser(prog="python -m hagan_clinic.config", description="The config's keys.")
parser.add_argument("--markdown", action="store_true", help="print the key table in Markdown (the README's)")
parser.add_argument("sections", nargs="*", help=f"top-level keys (default: {' '.join(README_SECTIONS)})")
args = parser.parse_args()
table = config_keys(args.sections or README_SECTIONS)
if args.markdown:
    print(markdown_table(args.sections or README_SECTIONS))
else:
    print("\n".join(f"{k} = {_cell(v)}  # {d}" for k, v, d in table))
