"""Prior throughput: sampling with the KV cache against without it, and training tokens per second.

    python benchmarks/sampling_benchmark.py            # sampling: tiny prior; training: tiny and base
    python benchmarks/sampling_benchmark.py --quick    # 16x16 grids only, smaller batches
    python benchmarks/sampling_benchmark.py --sizes tiny base --repeats 3 --threads 1

Sampling runs ``stage2_prior.sample_grids`` (transformers' generate) on a randomly initialised prior of
K = 1024 codes; the weights do not change the cost. Without the cache every step re-runs the whole prefix,
so its cost grows with the square of the grid length; with the cache each step feeds one token. Training
is forward + backward + AdamW step on random grids. Every number is the median of ``--repeats`` timed runs
after an untimed warm-up run. On a CPU shared with other jobs, ``--threads 1`` avoids the stalls of
intra-op threads waiting for each other. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from stage2_prior import PRIOR_SIZES, build_prior, sample_grids

CODEBOOK_SIZE = 1024
CACHED_REPEATS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    run: Callable[[], None], repeats: int, device: torch.device, warm_up: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, after one untimed call of ``warm_up`` (default ``run``)."""
    (warm_up or run)()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampling_rows(
    sizes: list[str], grids: list[int], batch_size: int, repeats: int, device: torch.device
) -> Iterator[str]:
    for size in sizes:
        for side in grids:
            prior = build_prior(CODEBOOK_SIZE, (side, side), size=size).to(device).eval()
            tokens = batch_size * side * side
            # Warm-up: one short grid batch (the uncached 32x32 run takes minutes; its first call is not special).
            # The cached run is short, so a burst of load on a shared machine can double one timing: it takes
            # the median of at least CACHED_REPEATS runs.
            seconds = {
                use_cache: median_seconds(
                    lambda: sample_grids(prior, batch_size, generator=0, use_cache=use_cache),
                    max(repeats, CACHED_REPEATS) if use_cache else repeats,
                    device,
                    warm_up=lambda: sample_grids(prior, 1, generator=0, use_cache=use_cache),
                )
                for use_cache in (True, False)
            }
            cached, uncached = tokens / seconds[True], tokens / seconds[False]
            yield (
                f"| {size} | {side}x{side} ({side * side}) | {batch_size} | {cached:,.0f} | {uncached:,.0f} "
                f"| {cached / uncached:.1f}x |"
            )


def training_rows(
    sizes: list[str], grids: list[int], batch_size: int, repeats: int, device: torch.device, precisions: list[str]
) -> Iterator[str]:
    for size in sizes:
        for side in grids:
            prior = build_prior(CODEBOOK_SIZE, (side, side), size=size).to(device).train()
            optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4)
            grids_batch = torch.randint(0, CODEBOOK_SIZE, (batch_size, side, side), device=device)
            inputs = prior.lm_inputs(grids_batch)
            rates = {}
            for precision in precisions:
                def step() -> None:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = prior(**inputs).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                rates[precision] = batch_size * side * side / median_seconds(step, repeats, device)
            cells = " | ".join(f"{rates[p]:,.0f}" for p in precisions)
            ratio = f" | {rates['bf16'] / rates['fp32']:.2f}x" if len(precisions) == 2 else ""
            params = sum(p.numel() for p in prior.parameters()) / 1e6
            yield f"| {size} ({params:.1f}M) | {side}x{side} ({side * side}) | {batch_size} | {cells}{ratio} |"


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16 grids only, batch 4 (training 8)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(PRIOR_SIZES), default=["tiny"], help="sampled priors")
    parser.add_argument("--train_sizes", nargs="+", choices=sorted(PRIOR_SIZES), default=["tiny", "base"])
    parser.add_argument("--grids", nargs="+", type=int, default=None, help="grid sides (default 16 32; quick 16)")
    parser.add_argument("--batch_size", type=int, default=None, help="sampling batch (default 8; quick 4)")
    parser.add_argument("--train_batch_size", type=int, default=None, help="training batch (default 16; quick 8)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per cell")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    grids = args.grids or ([16] if args.quick else [16, 32])
    batch_size = args.batch_size or (4 if args.quick else 8)
    train_batch_size = args.train_batch_size or (8 if args.quick else 16)
    repeats = args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# Prior throughput ({name}; torch {torch.__version__}; K = {CODEBOOK_SIZE}; fp32 sampling)\n")
    print("## Sampling: tokens / s, KV cache against none\n")
    print("| prior | grid (tokens) | batch | with KV cache | without | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in sampling_rows(args.sizes, grids, batch_size, repeats, device):
        print(row, flush=True)
    if args.skip_training:
        return
    precisions = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    print("\n## Training: tokens / s (forward + backward + AdamW step)\n")
    header = " | ".join(precisions) + (" | bf16 / fp32" if len(precisions) == 2 else "")
    print(f"| prior | grid (tokens) | batch | {header} |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in range(len(precisions) + (len(precisions) == 2))) + " |")
    for row in training_rows(args.train_sizes, grids, train_batch_size, repeats, device, precisions):
        print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
