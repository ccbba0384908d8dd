"""Train a stage-one image tokenizer.

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer_tiny.yaml [--key value ...]
    python scripts/train_tokenizer.py --config configs/tokenizer_tiny.yaml --quantizer transvq
    accelerate launch --multi_gpu --num_processes 2 scripts/train_tokenizer.py --config ...   # 2 CPU processes

Every field of ``TokenizerTrainingConfig`` (stage1_tokenizer/config.py) is a ``--field``; the command line
overrides the YAML file. Resume an interrupted run with ``--resume_from_checkpoint latest``.
"""

from stage1_tokenizer.config import TokenizerTrainingConfig, load_config
from stage1_tokenizer.training import train_tokenizer


def main(argv=None) -> dict:
    return train_tokenizer(load_config(TokenizerTrainingConfig, argv))


if __name__ == "__main__":
    main()
