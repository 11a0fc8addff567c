"""Each CUDA kernel against its CPU twin (the same shared math) on the cases that stress indexing,
and each kernel's bandwidth beside a device-to-device copy measured in the same run. Part of
benchmarks/gpu_check.sh, which runs `--cases` under compute-sanitizer memcheck and racecheck.

    python benchmarks/gpu_kernels.py --cases [distill pool_store gather adam]
    python benchmarks/gpu_kernels.py --bandwidth --json out.json
"""
import argparse
import functools
import json
import sys

import torch

import fasttl
from fasttl import _ops
from fasttl.cache.kernels import gather, pool_store

CUDA = torch.device("cuda")


def close(name, got, expected, rtol, atol):
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True):
        err = (got - expected).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{name}: CUDA differs from CPU by up to {err:.3g}")


# ---- cases: odd shapes, sizes 1, non-contiguous and strided inputs --------------------------------
def distill_cases():
    out = []
    for rows, classes, sdt, tdt, hard, strided in [(1, 1, torch.float32, torch.float32, True, False),
                                                   (7, 33, torch.float32, torch.float32, False, True),
                                                   (41, 1271, torch.float32, torch.bfloat16, True, True),
                                                   (5, 1025, torch.bfloat16, torch.float32, True, False),
                                                   (3, 40000, torch.float16, torch.float16, True, True)]:
        width = classes + 5 if strided else classes
        student = (torch.randn(rows, width) * 4)[:, :classes].to(sdt)   # rows strided when width > classes
        teacher = (torch.randn(rows, width) * 4)[:, :classes].to(tdt)
        teacher[0, : max(1, classes // 3)] = float("-inf")                 # classes the teacher rules out
        target = torch.randint(0, classes, (2 * rows,))[::2] if hard else None  # strided target
        if hard and rows > 2:
            target[1] = -100
        tag = f"distill {rows}x{classes} {str(sdt)[6:]}/{str(tdt)[6:]}{' strided' if strided else ''}"
        out.append((tag, student, teacher, target))
    return out


def on_cuda(t):
    """`t` on the GPU with the same strides (a strided input stays strided)."""
    if t is None:
        return None
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=CUDA).copy_(t)


def check_distill():
    for tag, student, teacher, target in distill_cases():
        cpu = _ops.distill_rows(student, teacher, target, 2.0, 0.7, -100)
        gpu = _ops.distill_rows(on_cuda(student), on_cuda(teacher), on_cuda(target), 2.0, 0.7, -100)
        tol = 1e-4 if student.dtype == torch.float32 else 2e-2
        close(tag + " loss", gpu[0], cpu[0], tol, 1e-5)
        close(tag + " grad", gpu[1].float(), cpu[1].float(), tol, 1e-5)
        print(f"ok  {tag}")


def check_pool_store():
    cases = [((1, 1, 1, 1), "nchw"), ((17, 41, 3, 5), "nchw"), ((9, 1280, 7, 7), "channels_last"),
             ((12, 96, 5, 3), "batch slice"), ((8, 64, 4, 4), "channel stride 2"), ((6, 7), "2-D")]
    for shape, layout in cases:
        x = torch.randn(shape) * 3
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "batch slice":
            x = x.contiguous(memory_format=torch.channels_last)[2:9]
        elif layout == "channel stride 2":
            x = torch.randn(shape[0], 2 * shape[1], *shape[2:])[:, ::2]
        for src_dtype in (torch.float32, torch.bfloat16):
            for cache_dtype in (torch.float16, torch.int8):
                src = x.to(src_dtype)
                n, c = src.shape[0], src.shape[1]
                rows = torch.randperm(2 * n + 6)[: 2 * n : 2].to(torch.int32)  # strided int32 rows
                caches = []
                for device in ("cpu", CUDA):
                    cache = torch.zeros(2 * n + 6, c, dtype=cache_dtype, device=device)
                    scales = torch.zeros(2 * n + 6, device=device) if cache_dtype == torch.int8 else None
                    moved = src if device == "cpu" else on_cuda(src)
                    pool_store(moved, cache, rows.to(device), scales)
                    caches.append((cache, scales))
                tag = f"pool_store {tuple(src.shape)} {layout} {str(src_dtype)[6:]}->{str(cache_dtype)[6:]}"
                close(tag, caches[1][0].float(), caches[0][0].float(), 1e-3, 1.0 if cache_dtype == torch.int8 else 1e-4)
                if cache_dtype == torch.int8:
                    close(tag + " scales", caches[1][1], caches[0][1], 1e-5, 0)
                print(f"ok  {tag}")


def check_gather():
    for rows, channels, count in [(1, 1, 1), (300, 129, 1000), (50, 7, 64), (40, 1280, 33), (9, 2049, 5)]:
        for cache_dtype in (torch.float16, torch.int8):
            cache = (torch.randn(rows, channels) * 50).to(cache_dtype)
            scales = torch.rand(rows) if cache_dtype == torch.int8 else None
            idx = torch.randint(0, rows, (2 * count,), dtype=torch.int32)[::2]  # strided int32
            for out_dtype in (torch.float32, torch.bfloat16):
                cpu = gather(cache, idx, scales, out_dtype)
                gpu = gather(cache.to(CUDA), idx.to(CUDA), None if scales is None else scales.to(CUDA), out_dtype)
                tag = f"gather {rows}x{channels} [{count}] {str(cache_dtype)[6:]}->{str(out_dtype)[6:]}"
                close(tag, gpu.float(), cpu.float(), 0, 0)
                print(f"ok  {tag}")


def adam_params(device, shapes, dtype, offset_view=True):
    torch.manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype).to(device)) for s in shapes]
    if offset_view:  # a param one element into its storage: unaligned for vector loads
        flat = torch.randn(1002).to(dtype).to(device)
        params.append(torch.nn.Parameter(flat[1:1002]))
    return params


def run_adam(device, shapes, dtype, amsgrad, steps=3, lr=1e-2, grads=None):
    params = adam_params(device, shapes, dtype)
    opt = fasttl.optim.AdamW(params, lr=lr, weight_decay=0.1, amsgrad=amsgrad)
    for i in range(steps):
        for j, p in enumerate(params):
            p.grad = grads[i][j].to(device)
        opt.step()
    return params, opt


def check_adam():
    shapes = [(1,), (3,), (16385,), (70001,), (33, 7)] + [(5,)] * 120  # > 96 tensors: several launches
    for dtype in (torch.float32, torch.bfloat16):
        for amsgrad in (False, True):
            base = adam_params("cpu", shapes, dtype)
            grads = [[torch.randn_like(p) for p in base] for _ in range(3)]
            cpu, opt_c = run_adam("cpu", shapes, dtype, amsgrad, grads=grads)
            gpu, opt_g = run_adam(CUDA, shapes, dtype, amsgrad, grads=grads)
            tag = f"adam {len(cpu)} tensors {str(dtype)[6:]}{' amsgrad' if amsgrad else ''}"
            for p, q in zip(cpu, gpu):
                key = "master_param" if dtype != torch.float32 else None
                a = opt_c.state[p][key] if key else p
                b = opt_g.state[q][key] if key else q
                close(tag, b, a, 1e-5, 1e-6)
            print(f"ok  {tag}")


CHECKS = {"distill": check_distill, "pool_store": check_pool_store, "gather": check_gather, "adam": check_adam}


# ---- bandwidth ---------------------------------------------------------------------------------
def time_ms(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def bandwidth() -> list:
    results = []

    def report(name, nbytes, ms):
        results.append({"kernel": name, "bytes": nbytes, "ms": ms, "GB/s": nbytes / ms / 1e6})
        ratio = f"{results[-1]['GB/s'] / results[0]['GB/s']:6.0%} of copy" if len(results) > 1 else ""
        print(f"{name:<58} {ms:8.3f} ms {results[-1]['GB/s']:8.0f} GB/s  {ratio}")

    a = torch.empty(2**28, device=CUDA)
    b = torch.empty_like(a)
    report("device-to-device copy, 1 GiB", 2 * a.numel() * 4, time_ms(functools.partial(b.copy_, a)))
    del a, b

    for rows, classes, dtype in [(8192, 1000, torch.bfloat16), (256, 32000, torch.bfloat16), (8, 128000, torch.float32)]:
        s, t = torch.randn(rows, classes, device=CUDA).to(dtype), torch.randn(rows, classes, device=CUDA).to(dtype)
        y = torch.randint(0, classes, (rows,), device=CUDA)
        # The least a fused pass can move: read student and teacher once, write the gradient.
        nbytes = 3 * s.numel() * s.element_size()
        report(f"distill_rows {rows}x{classes} {str(dtype)[6:]} (min traffic)", nbytes,
               time_ms(lambda: _ops.distill_rows(s, t, y, 2.0, 0.5, -100)))

    maps = torch.randn(256, 1280, 7, 7, device=CUDA).bfloat16()
    cache = torch.empty(256, 1280, dtype=torch.float16, device=CUDA)
    rows = torch.arange(256, device=CUDA)
    for layout, src in (("channels_last", maps.contiguous(memory_format=torch.channels_last)), ("NCHW", maps)):
        nbytes = src.numel() * 2 + cache.numel() * 2
        report(f"pool_store 256x1280x7x7 bf16 {layout} -> fp16", nbytes, time_ms(lambda: pool_store(src, cache, rows)))

    for cache_dtype, channels in ((torch.int8, 1280), (torch.float16, 1280), (torch.float16, 7)):
        big = torch.randn(200_000, channels, device=CUDA).to(cache_dtype)
        scales = torch.rand(200_000, device=CUDA) if cache_dtype == torch.int8 else None
        idx = torch.randint(0, 200_000, (8192,), device=CUDA)
        nbytes = idx.numel() * channels * (big.element_size() + 4)
        report(f"gather 8192 of 200000x{channels} {str(cache_dtype)[6:]} -> fp32", nbytes,
               time_ms(lambda: gather(big, idx, scales)))

    # 16 tensors of 4,000,001 bf16 params (245 chunks each): more chunks than one wide launch
    # takes (3072), so one tensor is split across two launches.
    shapes = [(4_000_001,)] * 16
    params = [torch.nn.Parameter(torch.randn(s, device=CUDA).bfloat16()) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    cpu = [torch.nn.Parameter(p.detach().cpu()) for p in params[11:14]]
    for c, p in zip(cpu, params[11:14]):
        c.grad = p.grad.cpu()
    opt = fasttl.optim.AdamW(params, lr=1e-3)
    opt.step()
    cpu_opt = fasttl.optim.AdamW(cpu, lr=1e-3)
    cpu_opt.step()
    for c, p in zip(cpu, params[11:14]):  # tensor 12 is the split one
        close("adam across a launch split", opt.state[p]["master_param"], cpu_opt.state[c]["master_param"], 1e-5, 1e-6)
    print("ok  adam across a launch split")
    n = sum(p.numel() for p in params)
    # bf16 param r/w, bf16 grad, fp32 master r/w, m r/w, v r/w.
    report(f"adam step {n / 1e6:.0f}M bf16 params + fp32 masters", n * 30, time_ms(opt.step, iters=10))
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    for f, p in zip(fp32, params):
        f.grad = p.grad.float()
    del params, opt
    ref = torch.optim.AdamW(fp32, lr=1e-3, fused=True)
    report(f"torch AdamW(fused=True) {n / 1e6:.0f}M fp32 params (same run)", n * 28, time_ms(ref.step, iters=10))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="*", choices=sorted(CHECKS), help="kernels to check (default: all)")
    parser.add_argument("--bandwidth", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible")
        return 2
    torch.manual_seed(0)
    failed = False
    if args.cases is not None:
        for name in args.cases or sorted(CHECKS):
            try:
                CHECKS[name]()
            except AssertionError as error:
                print(f"FAIL {error}")
                failed = True
        fasttl.raise_device_errors()
    if args.bandwidth:
        results = bandwidth()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
