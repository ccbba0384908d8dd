"""Training time per step of each quantizer relative to vq, on one training config, side by side.

One full optimizer step as scripts/train_tokenizer.py takes it (forward, the config's loss, backward,
gradient clipping, AdamW), for every quantizer on the same batch of real training images, interleaved
(vq, ema, ..., vq, ema, ...) so that machine load hits all alike. Prints the median seconds per step and
the ratio to vq; this is the "time per step" column of the paper comparison in docs/results.md.

    python benchmarks/train_step_benchmark.py --config configs/tokenizer_paper_cpu64.yaml --threads 1
    python benchmarks/train_step_benchmark.py --quantizers vq nsvq --repeats 20
    python benchmarks/train_step_benchmark.py --config configs/tokenizer_paper_celebahq64.yaml --num_images 8000
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from stage1_tokenizer import VQTokenizer
from stage1_tokenizer.config import TokenizerTrainingConfig, load_config
from stage1_tokenizer.data import load_image_dataset
from stage1_tokenizer.training import build_loss

PAPER_QUANTIZERS = ["vq", "ema", "fc", "simvq", "nsvq", "transvq"]


class Trainer:
    """One quantizer's model, loss and optimizer; :meth:`step` is one training step."""

    def __init__(self, cfg: TokenizerTrainingConfig):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.tokenizer = VQTokenizer(**cfg.tokenizer_kwargs()).train()
        self.loss = build_loss(cfg)
        self.trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
        )
        self.global_step = 0

    def step(self, images: torch.Tensor) -> float:
        self.tokenizer.set_step(self.global_step)
        output = self.tokenizer(images)
        loss, _ = self.loss.generator_loss(
            images, output.reconstruction, output.quantizer_loss, self.global_step,
            last_layer_weight=self.tokenizer.last_layer_weight,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.global_step += 1
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tokenizer_paper_cpu64.yaml")
    parser.add_argument("--quantizers", nargs="+", default=PAPER_QUANTIZERS)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per quantizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--num_images", type=int, default=None,
                        help="size of the image source (default: the config's); only one batch is used")
    args = parser.parse_args()
    if "vq" not in args.quantizers:
        parser.error("--quantizers must include vq, the reference of the ratios")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [] if args.num_images is None else ["--num_images", str(args.num_images)]
    base = load_config(TokenizerTrainingConfig, ["--config", args.config, *overrides])
    dataset = load_image_dataset(base.dataset, split="train", image_size=base.image_size,
                                 num_images=base.num_images, seed=base.data_seed, cache_dir=base.cache_dir)
    images = torch.stack([dataset[i]["pixel_values"] for i in range(base.batch_size)])
    trainers = {q: Trainer(dataclasses.replace(base, quantizer=q)) for q in args.quantizers}
    times: dict[str, list[float]] = {q: [] for q in trainers}
    for round_index in range(args.warmup + args.repeats):
        for quantizer, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(images)
            if round_index >= args.warmup:
                times[quantizer].append(time.perf_counter() - start)
    reference = statistics.median(times["vq"])
    print(f"config {args.config}: batch {base.batch_size}, {base.image_size} px, K = {base.codebook_size}, "
          f"threads {torch.get_num_threads()}, {args.repeats} timed steps each (medians)")
    print("| quantizer | s/step | vs vq |")
    print("|---|---|---|")
    for quantizer, values in times.items():
        median = statistics.median(values)
        print(f"| {quantizer} | {median:.3f} | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
