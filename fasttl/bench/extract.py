"""Extraction engines: images/s of each engine and precision that can run the frozen backbone,
beside the plain eager fp32 forward a user would write (`model.eval()`, NCHW, batch norms
separate), measured in the same run, and how far each engine's features are from fp32 PyTorch."""
from __future__ import annotations

import time
from typing import Dict, List, Tuple

import torch

from fasttl import backbones
from fasttl.bench.ceiling import PEAK_SIZE, machine_peaks, macs_per_image
from fasttl.bench.common import format_table
from fasttl.cache import engines
from fasttl.cache.extraction import default_batch_size, extraction_engine, store_maps


def _rate(step, batch: int, repeats: int) -> float:
    step()  # warm-up: allocations, oneDNN primitive caches, ONNX Runtime's first run
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - start)


def _candidates(device: torch.device) -> List[Tuple[str, str]]:
    rows = [("torch", "fp32"), ("torch", "bf16")]
    if device.type == "cpu" and engines.onnxruntime_available():
        rows[1:1] = [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    return rows


# (backbone, sizes, taps, with bf16): the default backbone in full, the larger one at the default
# features only (bf16 is emulated, 10x slower, on CPUs without native bf16: timed once).
PLAN = (("efficientnet_lite0", (128, 160, 224), (0, 4), True), ("efficientnet_lite2", (128, 160, 224), (4,), False))
QUICK_PLAN = (("efficientnet_lite0", (64,), (0, 4), True),)


@torch.no_grad()
def run(device: str = "cpu", quick: bool = False) -> Dict[str, object]:
    device = torch.device(device)
    batch = default_batch_size(device)
    repeats = 1 if quick else 4
    rows = []
    peaks = machine_peaks(str(device))
    for backbone_name, sizes, taps_list, with_bf16 in (QUICK_PLAN if quick else PLAN):
        backbone = backbones.create(backbone_name)
        plain = backbone.eval().to(device)
        folded = backbone.for_extraction().to(device)
        for size in sizes:
            macs = macs_per_image(plain, size, device)
            x = torch.randn(batch, 3, size, size, device=device)
            eager = _rate(lambda: plain.forward_pooled(x), batch, repeats)
            for taps in taps_list:
                reference = engines.pooled_reference(folded, taps, x)
                for engine_name, precision in _candidates(device):
                    if precision == "bf16" and not with_bf16:
                        continue
                    engine = extraction_engine(backbone, device, engine_name, precision, taps, size,
                                               calibration=("bench", x))  # int8: ranges from the timed batch
                    cache = torch.empty((batch, backbone.tapped_dim(taps)), dtype=torch.float32, device=device)
                    rows_index = torch.arange(batch, device=device)
                    rate = _rate(lambda: store_maps(engine(x), cache, rows_index, None), batch,
                                 1 if precision == "bf16" else repeats)
                    gflops = 2 * macs * rate / 1e9
                    int8_peak = peaks.get("int8_gops") if precision == "int8" else None
                    rows.append({"backbone": backbone_name, "size": size, "taps": taps, "engine": engine_name,
                                 "precision": precision, "images_per_s": rate, "eager_fp32_images_per_s": eager,
                                 "relative_error": engines.relative_error(cache, reference), "gmacs_per_image":
                                 macs / 1e9, "gflops": gflops, "fraction_of_fp32_peak": gflops / peaks["fp32_gflops"],
                                 "fraction_of_int8_peak": gflops / int8_peak if int8_peak else None})
    return {"name": "extract", "device": str(device), "batch": batch, "rows": rows, "peaks": peaks,
            "native_bf16": engines.cpu_has_native_bf16(), "threads": torch.get_num_threads(), "notes": [
                f"Batch {batch}, {torch.get_num_threads()} threads, random images; each engine pools and stores the "
                "features as extraction does (pool_store). eager: model.eval() forward_pooled in fp32, NCHW, batch "
                "norms unfolded, the head's features only: what a user writes. multi: the last four stages' "
                "pooled outputs beside the head's (the `fasttl run` default).",
                "relative error: max |engine - PyTorch fp32| / max |PyTorch fp32| over the batch. int8: ONNX "
                "Runtime's static quantization calibrated on the timed batch itself (its accuracy on real images: "
                "\"int8 extraction\").",
                "GFLOP/s: 2 x the multiply-accumulates of the backbone's convolutions and linear layers per image "
                f"(counted by forward hooks) x images/s; of peak: against this machine's dense fp32 GEMM rate measured "
                f"in the same run ({_peak_line(peaks)}).",
                f"CPU native bf16 (AVX512-BF16 or AMX): {engines.cpu_has_native_bf16()}; without it bf16 is emulated."]}


def _peak_line(peaks: Dict[str, object]) -> str:
    int8 = f", int8 {peaks['int8_gops']:.0f} GOP/s" if peaks.get("int8_gops") else ", no int8 GEMM measured"
    return (f"{torch.get_num_threads()} threads, {PEAK_SIZE} x {PEAK_SIZE} matmuls: fp32 {peaks['fp32_gflops']:.0f} "
            f"GFLOP/s{int8}")


def speedups(result: Dict[str, object]) -> List[Tuple[str, float]]:
    return [(f"{r['backbone'][-5:]} {r['size']} px taps {r['taps']}\n{r['engine']} {r['precision']}",
             r["images_per_s"] / r["eager_fp32_images_per_s"]) for r in result["rows"]]


def table(result: Dict[str, object]) -> str:
    rows = [[r["backbone"], f"{r['size']} px", "multi" if r["taps"] else "head", r["engine"], r["precision"],
             f"{r['images_per_s']:.0f}", f"{r['eager_fp32_images_per_s']:.0f}",
             f"{r['images_per_s'] / r['eager_fp32_images_per_s']:.2f}x", f"{r['relative_error']:.1e}",
             _ceiling_cells(r)] for r in result["rows"]]
    return format_table(["backbone", "size", "features", "engine", "precision", "images/s", "eager fp32 images/s",
                         "vs eager", "relative error", "GFLOP/s (of fp32 peak; int8 rows: of int8 peak)"], rows)


def _ceiling_cells(row: Dict[str, object]) -> str:
    if "gflops" not in row:  # recorded before the ceiling was measured
        return "-"
    if row.get("fraction_of_int8_peak"):  # int8 arithmetic, against the machine's int8 GEMM rate
        return f"{row['gflops']:.0f} ({row['fraction_of_int8_peak']:.0%} of int8)"
    return f"{row['gflops']:.0f} ({row['fraction_of_fp32_peak']:.0%})"
