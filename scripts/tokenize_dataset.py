"""Encode an image dataset with a trained tokenizer into a token-grid dataset (resumable: rerun to continue).

    python scripts/tokenize_dataset.py --tokenizer outputs/tokenizer/tokenizer --source synthetic-faces \
        --output_dir outputs/tokens --image_size 64 [--flip_augment]
"""

from __future__ import annotations

import argparse
import sys

import torch

from stage2_prior.token_dataset import resolve_tokenizer, tokenize_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder saved by save_pretrained, or a Hub id")
    parser.add_argument("--source", default="synthetic-faces",
                        help="synthetic-faces, lfw-subset, an image folder or a Hub dataset id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--splits", nargs="+", default=["train", "validation"])
    parser.add_argument("--flip_augment", action="store_true", help="also store mirrored training images")
    parser.add_argument("--num_images", type=int, default=None, help="size of the whole source (all splits)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic-faces seed")
    parser.add_argument("--shard_size", type=int, default=4096, help="images per shard (unit of resumption)")
    parser.add_argument("--num_workers", type=int, default=0, help="image-decoding worker processes")
    parser.add_argument("--cache_dir", default=None, help="image dataset cache")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Loaded here to place it on the device; from_pretrained records the folder / Hub id in its config.
    tokenizer, _ = resolve_tokenizer(args.tokenizer)
    tokenizer.to(args.device)
    data = tokenize_dataset(
        tokenizer,
        args.source,
        args.output_dir,
        image_size=args.image_size,
        batch_size=args.batch_size,
        splits=args.splits,
        flip_augment=args.flip_augment,
        num_images=args.num_images,
        seed=args.seed,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        cache_dir=args.cache_dir,
    )
    info = data.info
    print(f"{info.num_rows} grids of {info.grid_size[0]}x{info.grid_size[1]} codes (K={info.codebook_size}, "
          f"tokenizer {info.tokenizer_hash}) saved to {args.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
