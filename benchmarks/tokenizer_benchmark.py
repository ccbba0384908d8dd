"""Tokenizer encode / decode speed against diffusers' VQModel with the same blocks, side by side.

Both models are built from the same config (blocks, channels, D, K), run in eval mode without gradients
on the same batches, interleaved (ours, theirs, ours, theirs, ...) so that machine load hits both
alike; the table reports medians and the ratio ours / theirs (target: within 10%, i.e. >= 0.90).

    encode: images -> indices   ours: tokenizer.encode(x)
                                VQModel: quantize(encode(x).latents) -> indices
    decode: indices -> images   ours: tokenizer.decode(indices)
                                VQModel: decode(indices, force_not_quantize=True) with lookup_from_codebook

    python benchmarks/tokenizer_benchmark.py                      # the paper's 64 px preset, vq and transvq
    python benchmarks/tokenizer_benchmark.py --batch-size 32 --repeats 20 --quantizers vq nsvq
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import VQModel

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.quantizers import QUANTIZERS


def diffusers_twin(tokenizer: VQTokenizer) -> VQModel:
    """A diffusers VQModel with the tokenizer's blocks, channels, D and K, looking codes up by index."""
    config = tokenizer.config
    return VQModel(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple(config.down_block_types), up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
        act_fn=config.act_fn, latent_channels=config.latent_channels, sample_size=config.sample_size,
        num_vq_embeddings=config.codebook_size, norm_num_groups=config.norm_num_groups,
        vq_embed_dim=config.latent_channels, mid_block_add_attention=config.mid_block_add_attention,
        lookup_from_codebook=True,
    ).eval()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def benchmark(quantizer: str, batch_size: int, repeats: int, warmup: int) -> list[dict]:
    """Median images/s of encode and decode for ours and VQModel, measured interleaved."""
    torch.manual_seed(0)
    ours = VQTokenizer.paper_celebahq64(quantizer=quantizer).eval()
    theirs = diffusers_twin(ours)
    size = ours.config.sample_size
    images = torch.rand(batch_size, 3, size, size) * 2 - 1
    indices = ours.encode(images)
    h, w = indices.shape[1:]
    shape = (batch_size, h, w, ours.config.latent_channels)
    tasks = {
        ("encode", "ours"): lambda: ours.encode(images),
        ("encode", "VQModel"): lambda: theirs.quantize(theirs.encode(images).latents)[2][2],
        ("decode", "ours"): lambda: ours.decode(indices),
        ("decode", "VQModel"): lambda: theirs.decode(indices.reshape(-1), force_not_quantize=True, shape=shape),
    }
    times = {key: [] for key in tasks}
    with torch.inference_mode():
        for repeat in range(warmup + repeats):
            for key, task in tasks.items():
                elapsed = seconds(task)
                if repeat >= warmup:
                    times[key].append(elapsed)
    rows = []
    for operation in ("encode", "decode"):
        ours_rate = batch_size / statistics.median(times[(operation, "ours")])
        theirs_rate = batch_size / statistics.median(times[(operation, "VQModel")])
        rows.append({"quantizer": quantizer, "operation": operation, "ours": ours_rate, "VQModel": theirs_rate,
                     "ratio": ours_rate / theirs_rate})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizers", nargs="+", default=["vq", "transvq"], choices=sorted(QUANTIZERS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"paper preset (64 px, f = 4, D = 64, K = 1024), batch {args.batch_size}, "
          f"{args.repeats} interleaved repeats, median; torch threads {torch.get_num_threads()}\n")
    print("| quantizer | operation | ours (images/s) | VQModel (images/s) | ours / VQModel |")
    print("| --- | --- | --- | --- | --- |")
    for quantizer in args.quantizers:
        for row in benchmark(quantizer, args.batch_size, args.repeats, args.warmup):
            print(f"| {row['quantizer']} | {row['operation']} | {row['ours']:.1f} | {row['VQModel']:.1f} | "
                  f"{row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
