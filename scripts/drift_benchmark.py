"""Drift benchmark: which quantizers keep their codebooks alive while the latents move (METHOD.md, "The claim").

    python scripts/drift_benchmark.py --quick --out outputs/demo        # ~2-3 minutes on 2 CPU cores
    python scripts/drift_benchmark.py --out outputs/drift               # every stream, K in {256, 1024, 4096}

Writes drift_table.md, drift_results.json and drift_utilisation.png under --out.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

import torch

from stage1_tokenizer.drift import STREAMS, DriftBenchmarkConfig, run_drift_benchmark, write_report
from stage1_tokenizer.quantizers import QUANTIZERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subset (one K, three streams, 400 steps)")
    parser.add_argument("--out", default="outputs/drift", help="output folder (default: outputs/drift)")
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--sizes", type=int, nargs="+", help="codebook sizes K")
    parser.add_argument("--streams", nargs="+", help=f"latent streams, from {sorted(STREAMS)}")
    parser.add_argument("--quantizers", nargs="+", help=f"quantizers (default: all registered, {sorted(QUANTIZERS)})")
    parser.add_argument("--batch-size", type=int, help="latents per step")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--window", type=int, help="utilisation window in steps (default: a tenth of the run)")
    parser.add_argument("--seed", type=int, help="seed for data, models and k-means")
    # One thread by default: on a shared 2-core machine under load, two torch threads made small training
    # steps 10-40x slower than one (the OpenMP workers wait on each other); unloaded, 2 is ~1.8x faster.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = DriftBenchmarkConfig.quick() if args.quick else DriftBenchmarkConfig()
    overrides = {
        "steps": args.steps,
        "sizes": args.sizes,
        "streams": args.streams,
        "quantizers": args.quantizers,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "window": args.window,
        "seed": args.seed,
    }
    config = replace(config, **{key: value for key, value in overrides.items() if value is not None})
    try:
        results = run_drift_benchmark(config, progress=not args.no_progress)
    except ValueError as err:
        sys.exit(f"error: {err}")
    command = shlex.join(["python", "scripts/drift_benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    paths = write_report(results, config, args.out, command=command)
    print(paths["table"].read_text())
    print(f"wrote {paths['table']}, {paths['json']}, {paths['plot']}")


if __name__ == "__main__":
    main()
