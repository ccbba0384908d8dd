"""Small builders shared by several test files (imported as ``from helpers import ...``; pytest puts
``tests/`` on the import path)."""

import torch

from stage1_tokenizer import VQTokenizer


def random_tiny_tokenizer(seed: int = 0, image_size: int = 32, codebook_size: int = 16) -> VQTokenizer:
    """An untrained 3-block (f = 4) tokenizer with 4 latent channels: cheap enough for token-dataset tests."""
    torch.manual_seed(seed)
    return VQTokenizer(
        sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        norm_num_groups=4,
        latent_channels=4,
        mid_block_add_attention=False,
        codebook_size=codebook_size,
    ).eval()
