"""Speed and peak memory of every quantizer in QUANTIZERS, relative to plain vq, measured side by side.

What is measured, per codebook size K (default 1024, 8192, 65536), D = 64:
    train   forward + backward of ``out.loss + sum(out.quantized * G)`` (G a fixed random decoder gradient),
            latents requiring grad: everything a training step spends in the quantizer.
    eval    forward only, under ``torch.no_grad()``, in eval mode (TransVQ's cached codebook).
on N = 4096 latents (16 x 16 x 16, z ~ N(0, 1)), and for transvq (against vq) also on N = 65,536, where
its codebook transformer is amortised over a large batch. Quantizers are built with their defaults. Rows
beyond the registry show NS-VQ in its other regime and rule:
    nsvq fitted tau=0.1   a codebook fitted to the latents (codes = latents + noise, as after training) and
                          tau = 0.1 (the default schedule's value after ~3 decay periods): most kernel weights
                          are exactly 0 and the sparse path runs. Plain ``nsvq`` (codes near the origin, as
                          at initialisation) has every weight nonzero: the dense path, the worst case.
    nsvq routing          rule="routing", straight_through="paper" (supplementary Sec. 10).

Timing: all quantizers of one (K, N, mode) run interleaved (a, b, c, a, b, c, ...) after one warm-up
call each, so that load on a shared machine hits them alike; the table reports medians and their ratio
to vq's median from the same rounds. ``--clock wall`` (default) times wall-clock seconds; ``--clock cpu``
the process's CPU seconds, which on a machine shared with other jobs is the steadier measure (use it
with ``--threads 1``: with more threads it also counts the threads' spin-waiting).

Peak memory (CPU): each (quantizer, K, N, mode) runs once in a fresh subprocess. It warms up on 64 latents
(MKL and thread-pool buffers), resets the kernel's high-water mark of resident memory (writing 5 to
/proc/self/clear_refs), records the current resident size, runs the measured call, and reports the
high-water mark minus that size (VmHWM - VmRSS from /proc/self/status); glibc's mmap threshold is fixed
at 64 KiB there, so that freed blocks leave the resident set at once. That counts every byte the call
touches, torch's tensors and the BLAS library's buffers alike, at page granularity; in-process counters
cannot (the high-water mark of a long-lived process is set by whatever ran before, and tracemalloc does
not see torch's allocator). Inputs and parameters exist before the reset, so the figure is the extra
memory of the call. On CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
memory allocated before the call.

    python benchmarks/quantizer_benchmark.py                       # everything (several minutes on 2 cores)
    python benchmarks/quantizer_benchmark.py --quick               # K = 1024 only, 3 rounds
    python benchmarks/quantizer_benchmark.py --sizes 8192 --repeats 9 --device cpu
    python benchmarks/quantizer_benchmark.py --threads 1 --clock cpu     # on a busy shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer

DIM = 64
BATCH_LATENTS = 4096  # 16 images of 16 x 16 latents
LARGE_BATCH_LATENTS = 65536  # 256 images of 16 x 16 latents
LARGE_BATCH_QUANTIZERS = ("vq", "transvq")


@dataclass(frozen=True)
class Entry:
    """One row of the table: a registry name with options, and how to prepare its codebook."""

    label: str
    name: str
    options: dict = field(default_factory=dict)
    fitted_codebook: bool = False


def entries() -> list[Entry]:
    rows = [Entry(name, name) for name in QUANTIZERS]
    if "nsvq" in QUANTIZERS:
        rows.append(Entry("nsvq fitted tau=0.1", "nsvq", {"tau": 0.1, "tau_schedule": "constant"}, True))
        rows.append(Entry("nsvq routing", "nsvq", {"rule": "routing", "straight_through": "paper"}))
    return rows


def latents(num_latents: int, device: str, seed: int = 0) -> torch.Tensor:
    """``[num_latents / 256, D, 16, 16]`` standard normal latents."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_latents // 256, DIM, 16, 16, generator=g).to(device)


def build(entry: Entry, codebook_size: int, z: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    q = build_quantizer(entry.name, codebook_size=codebook_size, dim=DIM, **entry.options).to(z.device)
    if entry.fitted_codebook:
        g = torch.Generator().manual_seed(1)
        flat = z.permute(0, 2, 3, 1).reshape(-1, DIM).cpu()
        fitted = flat[torch.randint(flat.shape[0], (codebook_size,), generator=g)]
        with torch.no_grad():
            q.codebook.copy_(fitted + 0.1 * torch.randn(fitted.shape, generator=g))
    return q


def make_call(q: torch.nn.Module, z: torch.Tensor, mode: str):
    """The measured work: a training step's quantizer part, or an eval forward."""
    if mode == "eval":
        q.eval()

        def call():
            with torch.no_grad():
                q(z)

        return call
    q.train()
    z = z.clone().requires_grad_()
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(2)).to(z.device)

    def call():
        out = q(z)
        (out.loss + (out.quantized * upstream).sum()).backward()
        # Freed here, not at the next call's start: no gradient outlives the call and hides in the
        # memory baseline of the next one.
        q.zero_grad(set_to_none=True)
        z.grad = None

    return call


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(
    rows: list[Entry], codebook_size: int, num_latents: int, mode: str, repeats: int, device: str, clock
) -> dict[str, float]:
    """Median milliseconds per call of every entry, measured interleaved."""
    z = latents(num_latents, device)
    calls = {entry.label: make_call(build(entry, codebook_size, z), z, mode) for entry in rows}
    for call in calls.values():
        call()
    times = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            synchronize(device)
            start = clock()
            call()
            synchronize(device)
            times[label].append(clock() - start)
    return {label: 1e3 * statistics.median(values) for label, values in times.items()}


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024


def probe_memory(entry: Entry, codebook_size: int, num_latents: int, mode: str, device: str) -> int:
    """Extra peak bytes of one call, in this process (run in a fresh subprocess on CPU)."""
    z = latents(num_latents, device)
    q = build(entry, codebook_size, z)
    make_call(q, latents(256, device)[:1, :, :8, :8], mode)()  # warm-up on 64 latents
    call = make_call(q, z, mode)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _proc_status("VmRSS")
    call()
    return _proc_status("VmHWM") - before


def peak_memory(entry: Entry, codebook_size: int, num_latents: int, mode: str, device: str) -> int:
    if device.startswith("cuda"):
        return probe_memory(entry, codebook_size, num_latents, mode, device)
    spec = json.dumps([entry.label, entry.name, entry.options, entry.fitted_codebook, codebook_size, num_latents, mode])
    # A fixed glibc mmap threshold: every block of 64 KiB or more is mapped on allocation and unmapped on
    # free. With glibc's default (a threshold that grows with the blocks freed), the warm-up's freed
    # buffers stay in the heap and the measured call reuses them unseen.
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(
        [sys.executable, __file__, "--memory-probe", spec, "--threads", str(torch.get_num_threads())],
        capture_output=True, text=True, check=True, env=environment,
    )
    return int(result.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [
        "| quantizer | K | N | mode | ms | x vq | peak MiB | x vq |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['K']} | {r['N']} | {r['mode']} | {r['ms']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['mib']:.1f} | {r['memory_ratio']:.2f} |"
        )
    return "\n".join(lines)


def run(sizes: list[int], repeats: int, device: str, large_batch_sizes: list[int], clock) -> list[dict]:
    results = []
    configs = [(k, BATCH_LATENTS, entries()) for k in sizes]
    large = [e for e in entries() if e.label in LARGE_BATCH_QUANTIZERS]
    configs += [(k, LARGE_BATCH_LATENTS, large) for k in large_batch_sizes]
    for codebook_size, num_latents, rows in configs:
        for mode in ("train", "eval"):
            ms = median_times(rows, codebook_size, num_latents, mode, repeats, device, clock)
            mib = {e.label: peak_memory(e, codebook_size, num_latents, mode, device) / 2**20 for e in rows}
            for entry in rows:
                results.append({
                    "label": entry.label, "K": codebook_size, "N": num_latents, "mode": mode,
                    "ms": ms[entry.label], "time_ratio": ms[entry.label] / ms["vq"],
                    "mib": mib[entry.label], "memory_ratio": mib[entry.label] / max(mib["vq"], 1e-9),
                })
            print(f"done: K={codebook_size} N={num_latents} {mode}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 65536], help="codebook sizes K")
    parser.add_argument("--large-batch-sizes", type=int, nargs="*", default=None,
                        help=f"K values for the N = {LARGE_BATCH_LATENTS} rows (vq, transvq); default: --sizes")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall-clock time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="K = 1024 only, 3 rounds")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        label, name, options, fitted, codebook_size, num_latents, mode = json.loads(args.memory_probe)
        entry = Entry(label, name, options, fitted)
        print(probe_memory(entry, codebook_size, num_latents, mode, args.device))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
    if "vq" not in QUANTIZERS:
        raise SystemExit("the table is relative to vq, which is not registered in QUANTIZERS")
    sizes, repeats = ([1024], 3) if args.quick else (args.sizes, args.repeats)
    large_batch_sizes = sizes if args.large_batch_sizes is None else args.large_batch_sizes
    if repeats < 1 or any(k < 2 for k in sizes + large_batch_sizes):
        raise SystemExit("--repeats must be >= 1 and every codebook size >= 2")
    if args.clock == "cpu" and args.device.startswith("cuda"):
        raise SystemExit("--clock cpu measures host CPU time; time a CUDA device with --clock wall")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = run(sizes, repeats, args.device, large_batch_sizes, clock)
    print(f"{torch.get_num_threads()} threads, device {args.device}, {args.clock} clock, D = {DIM}, "
          f"medians of {repeats} rounds\n")
    print(table(results))


if __name__ == "__main__":
    main()
