"""VQARPipeline: output types against a hand-made reference, reproducibility, argument errors, and
save_pretrained -> from_pretrained in the same and in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import VQARPipeline
from stage1_tokenizer import VQTokenizer
from stage2_prior import build_prior, sample_grids

K = 8
SIZE = 32


def tiny_tokenizer(quantizer: str = "vq", codebook_size: int = K, seed: int = 0) -> VQTokenizer:
    """32 px, f = 8 (4 x 4 tokens), K = 8, D = 4: ~24 k parameters."""
    torch.manual_seed(seed)
    return VQTokenizer(
        sample_size=SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
        quantizer=quantizer,
        codebook_size=codebook_size,
    ).eval()


def tiny_prior(codebook_size: int = K, num_classes: int = 0, seed: int = 1):
    torch.manual_seed(seed)
    return build_prior(codebook_size, (4, 4), num_classes, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32).eval()


def tiny_pipeline(quantizer: str = "vq", num_classes: int = 0) -> VQARPipeline:
    pipe = VQARPipeline(tokenizer=tiny_tokenizer(quantizer), prior=tiny_prior(num_classes=num_classes))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_images(pipe: VQARPipeline, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's job done by hand: sample grids with the same generator, decode, map [-1, 1] -> [0, 1]."""
    grids = sample_grids(pipe.prior, batch_size=batch_size, generator=seeded(seed))
    return grids, (pipe.tokenizer.decode(grids) + 1) / 2


def test_every_output_type_matches_the_hand_made_reference():
    pipe = tiny_pipeline()
    grids, images = reference_images(pipe, batch_size=3, seed=5)

    tokens = pipe(batch_size=3, generator=seeded(5), output_type="tokens").images
    assert tokens.dtype == torch.long and tokens.shape == (3, 4, 4)
    assert torch.equal(tokens, grids)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < K

    pt = pipe(batch_size=3, generator=seeded(5), output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (3, 3, SIZE, SIZE) and pt.dtype == torch.float32
    torch.testing.assert_close(pt, images, rtol=0, atol=1e-6)
    assert float(pt.min()) >= 0 and float(pt.max()) <= 1

    arr = pipe(batch_size=3, generator=seeded(5), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_allclose(arr, images.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)

    pil = pipe(batch_size=3, generator=seeded(5), output_type="pil").images
    assert len(pil) == 3 and all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) and im.mode == "RGB"
                                 for im in pil)
    expected = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), expected)


def test_decode_batch_size_and_return_dict_do_not_change_the_images():
    pipe = tiny_pipeline()
    whole = pipe(batch_size=5, generator=seeded(2), output_type="pt").images
    (chunked,) = pipe(batch_size=5, generator=seeded(2), output_type="pt", decode_batch_size=2, return_dict=False)
    # Same grids; the decoder's conv kernels sum in a batch-size-dependent order (differences ~3e-6).
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_same_generator_seed_same_samples_other_seed_other_samples():
    pipe = tiny_pipeline()
    first = pipe(batch_size=4, generator=seeded(11), output_type="tokens").images
    again = pipe(batch_size=4, generator=seeded(11), output_type="tokens").images
    other = pipe(batch_size=4, generator=seeded(12), output_type="tokens").images
    assert torch.equal(first, again)
    # 4 grids x 16 codes drawn from 8: two seeds agreeing everywhere has probability ~8^-64.
    assert not torch.equal(first, other)


def test_codebook_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="prior models 16 codes but the tokenizer has 8"):
        VQARPipeline(tokenizer=tiny_tokenizer(), prior=tiny_prior(codebook_size=16))


@pytest.mark.parametrize("bad", ["latent", "PIL", None])
def test_bad_output_type_is_refused(bad):
    with pytest.raises(ValueError, match="output_type must be one of"):
        tiny_pipeline()(batch_size=1, output_type=bad)


def test_save_pretrained_from_pretrained_same_process(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = VQARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, VQARPipeline)
    torch.testing.assert_close(loaded(batch_size=3, generator=seeded(4), output_type="pt").images,
                               pipe(batch_size=3, generator=seeded(4), output_type="pt").images, rtol=0, atol=0)


FRESH_PROCESS_LOAD = """
import sys
import numpy as np
import torch
torch.set_num_threads(1)
from pipelines import VQARPipeline

pipe = VQARPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=3, generator=torch.Generator().manual_seed(4), output_type="np").images
np.save(sys.argv[2], images)
"""


@pytest.mark.slow  # a fresh interpreter imports torch, diffusers and transformers: ~25 s on a loaded 2-core CPU
def test_save_pretrained_then_from_pretrained_in_a_fresh_process(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path / "pipe"), str(tmp_path / "out.npy")],
                   check=True, cwd=tmp_path, timeout=300)
    expected = pipe(batch_size=3, generator=seeded(4), output_type="np").images
    # Same tokens; pixels may differ ~3e-6 where the two processes' conv kernels sum in another order.
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)
