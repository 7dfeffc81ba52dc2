"""Which CT reconstruction kernels are sharp. Sharp (lung, bone, edge-enhancing) kernels raise image noise, and so
%LAA-950: QCT names them beside every emphysema index.

Flagged (the table is in docs/data.md): Siemens B/Br/Bl/Bv/Bf/D/Dr/I/Ir/Q/Qr/U/Ur with a number >= 45 (B45f is
COPDGene's sharp reconstruction; B46f, B50f, Br64, Bl57, I70f, U90u) and head kernels H/Hr >= 60 (bone: Hr64,
H70h); GE BONE, BONEPLUS, LUNG, EDGE, CHEST, DETAIL, ULTRA; Philips C, D, E, L, LA and YC, YD, YE, YF (C and YC are
Philips' "sharp" step above the standard B and YB); Canon/Toshiba FC30-FC39 (bone) and FC50-FC99 (lung, high
resolution); any first value containing SHARP, LUNG, BONE or EDGE. Smooth: Siemens below 45 (B30f, B40f, Br40),
GE SOFT and STANDARD, Philips A, B, YA, YB, Canon FC01-FC29 and FC40-FC49. A multi-valued kernel (``Br64\\2``,
``Br38f/3``) is named by its first value.
"""

from __future__ import annotations

import re

_SIEMENS = re.compile(r"^(?:B|BR|BL|BV|BF|D|DR|I|IR|Q|QR|U|UR)(\d{2})[A-Z]?$")
_SIEMENS_HEAD = re.compile(r"^(?:H|HR)(\d{2})[A-Z]?$")  # head kernels: H60 and above are bone kernels
_CANON = re.compile(r"^FC(\d{2})$")
_NAMED_SHARP = {"BONEPLUS", "CHEST", "DETAIL", "ULTRA", "C", "D", "E", "L", "LA", "YC", "YD", "YE", "YF"}


def is_sharp_kernel(kernel: str | None) -> bool:
    """Whether a ConvolutionKernel value names a sharp kernel (the list is in this module's docstring)."""
    if not kernel:
        return False
    name = re.sub(r"^([A-Z]+)\s+(?=\d)", r"\1", str(kernel).strip().upper())  # "Br 64" is Br64
    value = re.split(r"[\\/]", name)[0].strip()  # "Br64\\2", "Br38f/3", "SOFT\\LUNG": the first value names it
    first = (value.split() or [""])[0]
    if m := _SIEMENS.match(first):
        return int(m.group(1)) >= 45
    if m := _SIEMENS_HEAD.match(first):
        return int(m.group(1)) >= 60
    if m := _CANON.match(first):
        n = int(m.group(1))
        return 30 <= n <= 39 or n >= 50
    return first in _NAMED_SHARP or any(w in value for w in ("SHARP", "LUNG", "BONE", "EDGE"))
