"""Train the autoregressive prior on a token-grid dataset.

    python scripts/train_prior.py --config configs/prior_tiny.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 scripts/train_prior.py --config configs/prior_tiny.yaml

Every field of stage2_prior.training.PriorTrainingConfig is a flag; the command line overrides the YAML file.
Resume an interrupted run with --resume_from_checkpoint latest.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from stage1_tokenizer.config import load_config
from stage2_prior.training import PriorTrainingConfig, train_prior


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(PriorTrainingConfig, argv)
    result = train_prior(cfg)
    if PartialState().is_main_process:
        validation = result["validation"]
        summary = (
            f"validation loss {validation['loss']:.4f} nats = {validation['bits_per_token']:.4f} bits/token"
            if validation
            else "no validation split"
        )
        print(
            f"trained to step {result['step']} on {result['num_processes']} process(es), "
            f"mixed precision {result['mixed_precision']}; {summary}; prior saved to {result['prior_path']}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
