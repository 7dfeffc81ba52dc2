"""Encoder forward at the published geometry (untrained weights) in five numeric set-ups, side by side in one
process: fp32, bf16 autocast, weights cast once to bf16, fp32 channels-last 3D, bf16 weights channels-last 3D; with
the agreement of the features against fp32, and the machine's matmul rates and load (benchmarks/machine.py).

    python benchmarks/encode_variants.py [SIZE]     # writes benchmarks/results/encode_variants_SIZE.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable

import torch

from hagan_clinic.config import load_config
from hagan_clinic.models.hagan import HAGAN

from machine import RESULTS, agreement, record, write_result  # benchmarks/ is on sys.path when a script here runs

CL = torch.channels_last_3d


def best_of(fn: Callable[[], torch.Tensor], reps: int = 3) -> tuple[float, torch.Tensor]:
    """(fastest of ``reps`` timed calls after one warm-up, the output)."""
    out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    torch.set_num_threads(2)
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    torch.manual_seed(0)
    model = HAGAN.from_config(load_config(f"paper_{size}")).eval()
    x = torch.rand(1, 1, size, size, size) * 2 - 1
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fp32_cl = copy.deepcopy(model).to(memory_format=CL)
    bf16_cl = copy.deepcopy(bf16).to(memory_format=CL)
    x_cl = x.to(memory_format=CL)

    def autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode(x).float()

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "fp32": lambda: model.encode(x),
        "autocast_bf16": autocast,
        "weights_bf16": lambda: bf16.encode(x).float(),
        "fp32_channels_last": lambda: fp32_cl.encode(x_cl),
        "weights_bf16_channels_last": lambda: bf16_cl.encode(x_cl).float(),
    }
    machine = record("cpu")
    res: dict = {"size": size}
    outputs = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            res[f"{name}_s"], outputs[name] = best_of(fn)
    res["agreement_with_fp32"] = {k: agreement(outputs["fp32"], v) for k, v in outputs.items() if k != "fp32"}
    write_result(RESULTS / f"encode_variants_{size}.json", "encode_variants", machine, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
