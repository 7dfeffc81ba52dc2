"""Run discovery, assembly and QCT on folders of real scanners' files and report what happened to each.

    python benchmarks/validate_real_data.py [DATA_ROOT] [--masks DIR]
                                            # default root: $HAGAN_CLINIC_REAL_DATA or ../shared/data

What it does, with no unhandled exception allowed anywhere:
1. discovery of the whole root for CT and for MR: counts by status and every reason;
2. assembly of every series discovery keeps (both modalities): shape, spacing, notes, or the reason it failed;
3. every DICOM file decoded on its own (pixel data), counted: decoded, no pixel data, refused with the reason;
4. files that hold the same image in several transfer syntaxes (a folder of single slices sharing one
   SeriesInstanceUID) must decode to identical pixels;
5. QCT on every CT series kept: lung volume, %LAA-950, Perc15, kernel and warnings; with ``--masks DIR`` each
   lung mask is also written to DIR as NIfTI (named after the source) to check in a viewer over the scan.
The report goes to benchmarks/results/real_data_validation.json. The data is never copied.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom

from hagan_clinic.errors import HaganError
from hagan_clinic.io.cohort import NOT_DICOM, discover, load_series
from hagan_clinic.io.dicom import is_dicom_file
from hagan_clinic.io.volume import SeriesError


def _decode_all(root: Path) -> dict:
    counts: Counter = Counter()
    reasons: dict[str, str] = {}
    by_series: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower() in NOT_DICOM or path.name.endswith(".nii.gz") or path.suffix == ".nii":
            continue
        rel = str(path.relative_to(root))
        try:
            ds = pydicom.dcmread(path, force=not is_dicom_file(path))
        except Exception as err:  # noqa: BLE001 - the point is to count every kind of failure
            if is_dicom_file(path):
                counts["unparseable"] += 1
                reasons[rel] = f"{type(err).__name__}: {err}"[:120]
            else:
                counts["not DICOM"] += 1
            continue
        if "PixelData" not in ds:
            counts["no pixel data" if is_dicom_file(path) or "SOPClassUID" in ds else "not DICOM"] += 1
            continue
        try:
            pixels = ds.pixel_array
            counts["decoded"] += 1
            image = (str(ds.get("SeriesInstanceUID", "")), str(ds.get("ImagePositionPatient", "")))
            by_series[image].append((rel, str(ds.file_meta.TransferSyntaxUID), pixels))
        except Exception as err:  # noqa: BLE001
            counts["pixel data refused"] += 1
            reasons[rel] = f"{type(err).__name__}: {' '.join(str(err).split())}"[:120]
    identical = []
    for (uid, position), items in by_series.items():
        syntaxes = {ts for _, ts, _ in items}
        shapes = {p.shape for _, _, p in items}
        if len(items) > 1 and len(syntaxes) > 1 and len(shapes) == 1 and items[0][2].ndim == 2:
            same = all(np.array_equal(items[0][2], p) for _, _, p in items[1:])
            identical.append(
                {
                    "series_uid": uid,
                    "position": position,
                    "files": len(items),
                    "transfer_syntaxes": len(syntaxes),
                    "identical": same,
                }
            )
    return {"counts": dict(counts), "refused": reasons, "transfer_syntax_groups": identical}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("HAGAN_CLINIC_REAL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("root", nargs="?", default=default, help="folder of real scanners' files")
    parser.add_argument("--masks", type=Path, help="also write each QCT lung mask here as NIfTI")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"no real data at {root}; nothing to validate")
        return 0
    from hagan_clinic.io.nifti import write_scan
    from hagan_clinic.io.volume import Volume
    from hagan_clinic.qct import measure_with_mask

    report: dict = {"root": str(root), "discovery": {}, "assembly": [], "qct": []}
    for modality in ("CT", "MR"):
        found = discover(root, modality=modality, min_slices=2, progress=False)
        report["discovery"][modality] = {
            "counts": found.counts(),
            "ignored_files": found.ignored_files,
            "reasons": dict(Counter(r.reason.split(" (")[0] for r in found.records if r.status != "ok")),
        }
        for record in found.ok:
            entry = {"modality": modality, "source": record.folder, "kind": record.kind}
            try:
                volume = load_series(record, modality)
                entry.update(status="read", shape=volume.shape, spacing=[round(s, 3) for s in volume.spacing],
                             notes=volume.meta.get("notes", ""), kernel=volume.meta.get("kernel", ""))  # fmt: skip
                if modality == "CT" and volume.shape[0] >= 16:
                    try:
                        kernel, thickness = volume.meta.get("kernel"), volume.meta.get("slice_thickness_mm")
                        values, mask = measure_with_mask(volume.hu, volume.spacing, volume.valid, kernel, thickness)
                        report["qct"].append({"source": record.folder, **values})
                        if args.masks is not None:
                            name = re.sub(r"[^A-Za-z0-9._-]+", "_", re.sub(r"\.nii(\.gz)?$", "", record.folder))
                            lung = Volume(mask.astype(np.uint8), volume.spacing, volume.origin)
                            write_scan(args.masks / f"{name}.nii.gz", lung, np.uint8, "hagan-clinic lung mask")
                    except HaganError as err:  # QCTError: no lung in this scan
                        report["qct"].append({"source": record.folder, "error": str(err)})
            except SeriesError as err:
                entry.update(status="refused", reason=str(err))
            except Exception:  # noqa: BLE001 - must not happen; recorded loudly
                entry.update(status="UNHANDLED", reason=traceback.format_exc(limit=3))
            report["assembly"].append(entry)
    # the series refused for their geometry, read again with data.irregular=resample
    report["resampled"] = []
    for record in discover(root, modality="CT", min_slices=2, progress=False).records:
        if record.status == "skipped" and any(k in record.reason for k in ("tilt", "missing", "non-uniform")):
            entry = {"source": record.folder, "refused_as": record.reason}
            try:
                volume = load_series(record, "CT", irregular="resample")
                entry.update(shape=volume.shape, notes=volume.meta.get("notes", ""))
            except SeriesError as err:
                entry.update(still_refused=str(err))
            report["resampled"].append(entry)
    report["decoding"] = _decode_all(root)
    out = Path(__file__).parent / "results" / "real_data_validation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=1, default=str))
    unhandled = [e for e in report["assembly"] if e["status"] == "UNHANDLED"]
    return 1 if unhandled else 0


if __name__ == "__main__":
    sys.exit(main())
