"""VQTokenizer: shapes, the nearest-code contract, save/load, inference export, presets, the model card."""

from __future__ import annotations

import pytest
import torch
import yaml

from stage1_tokenizer import VQTokenizer, model_card
from stage1_tokenizer.quantizers import QUANTIZERS

K = 16
D = 8


def tiny_tokenizer(quantizer: str = "vq", **options) -> VQTokenizer:
    """32 px, f = 2 (16 x 16 tokens), K = 16, D = 8: ~0.2 M parameters."""
    torch.manual_seed(0)
    return VQTokenizer(
        sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        latent_channels=D,
        mid_block_add_attention=False,
        quantizer=quantizer,
        codebook_size=K,
        quantizer_options=options or None,
    )


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_forward_encode_decode_shapes(name):
    tokenizer = tiny_tokenizer(name)
    x = images()
    out = tokenizer(x)
    assert out.reconstruction.shape == (2, 3, 32, 32)
    assert out.indices.shape == (2, 16, 16) and out.indices.dtype == torch.long
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < K
    assert out.quantizer_loss.dim() == 0 and torch.isfinite(out.quantizer_loss)
    assert 1.0 <= float(out.perplexity) <= K
    tokenizer.eval()
    tokens = tokenizer.encode(x)
    assert tokens.shape == (2, 16, 16)
    decoded = tokenizer.decode(tokens)
    assert decoded.shape == (2, 3, 32, 32)
    assert decoded.min() >= -1 and decoded.max() <= 1
    # decode(encode(x)) is the eval-mode forward pass, clamped (up to the straight-through's rounding,
    # z + (q - z) for q).
    torch.testing.assert_close(decoded, tokenizer(x).reconstruction.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_encode_is_the_nearest_code_of_the_latents():
    tokenizer = tiny_tokenizer("vq").eval()
    with torch.no_grad():
        # Spread the codes so that the argmin is decided by more than rounding.
        tokenizer.quantize.embedding.weight.normal_()
        x = images(seed=3)
        latents = tokenizer.quant_conv(tokenizer.encoder(x)).permute(0, 2, 3, 1).reshape(-1, D)
        codes = tokenizer.quantize.embedding.weight
        brute_force = ((latents[:, None, :] - codes[None, :, :]) ** 2).sum(-1).argmin(1)
    assert torch.equal(tokenizer.encode(x).reshape(-1), brute_force)


def test_backward_reaches_encoder_decoder_and_codebook():
    tokenizer = tiny_tokenizer("vq")
    out = tokenizer(images())
    ((out.reconstruction - images()) ** 2).mean().add(out.quantizer_loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight"):
        grad = dict(tokenizer.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["vq", "transvq", "simvq"])
def test_save_load_round_trip_is_identical(tmp_path, name):
    tokenizer = tiny_tokenizer(name)
    with torch.no_grad():  # move away from the initialisation, so that loading defaults would show
        for p in tokenizer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.quantizer == name and loaded.config.codebook_size == K
    x = images(seed=5)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))
    # Bit-equal weights, but GEMM kernels may round differently for differently aligned buffers.
    torch.testing.assert_close(loaded(x).reconstruction, tokenizer(x).reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["transvq", "simvq"])
def test_export_for_inference_is_a_plain_table_with_identical_tokens(tmp_path, name):
    tokenizer = tiny_tokenizer(name)
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer.eval()
    exported = tokenizer.export_for_inference()
    assert exported.config.quantizer == "vq"
    assert [k for k in exported.state_dict() if k.startswith("quantize.")] == ["quantize.embedding.weight"]
    assert not exported.quantize.embedding.weight.requires_grad
    torch.testing.assert_close(exported.quantize.codebook, tokenizer.quantize.codebook, rtol=0, atol=0)
    x = images(batch=4, seed=7)
    tokens = tokenizer.encode(x)
    assert torch.equal(exported.encode(x), tokens)
    assert torch.equal(exported.decode(tokens), tokenizer.decode(tokens))
    # ... and it stays so through save/load (the published folder).
    exported.save_pretrained(tmp_path)
    reloaded = VQTokenizer.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.encode(x), tokens)


def test_export_refuses_a_cosine_lookup():
    with pytest.raises(ValueError, match="cannot be exported"):
        tiny_tokenizer("fc").export_for_inference()


def test_geometry_and_paper_preset():
    tokenizer = tiny_tokenizer()
    assert tokenizer.downsampling_factor == 2
    assert tokenizer.grid_size() == (16, 16) and tokenizer.grid_size(64) == (32, 32)
    assert tokenizer.last_layer_weight is tokenizer.decoder.conv_out.weight
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        tokenizer.grid_size(33)
    with pytest.raises(ValueError, match="expected images"):
        tokenizer(torch.zeros(2, 1, 32, 32))
    paper = VQTokenizer.paper_celebahq64()
    assert paper.downsampling_factor == 4 and paper.grid_size(64) == (16, 16)
    assert paper.config.latent_channels == 64 and paper.config.codebook_size == 1024
    assert paper.quantize.codebook.shape == (1024, 64)
    assert not any("attention" in type(m).__name__.lower() for m in paper.modules())
    assert paper(images(batch=1, size=64)).indices.shape == (1, 16, 16)


def test_constructor_rejects_inconsistent_blocks():
    with pytest.raises(ValueError, match="same, non-zero length"):
        VQTokenizer(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 3)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VQTokenizer(block_out_channels=(48, 48, 48), norm_num_groups=32)


def test_set_step_reaches_the_quantizer(monkeypatch):
    tokenizer = tiny_tokenizer()
    seen = []
    monkeypatch.setattr(tokenizer.quantize, "set_step", seen.append)
    tokenizer.set_step(17)
    assert seen == [17]


def test_model_card_folder(tmp_path):
    name = "transvq"
    tokenizer = tiny_tokenizer(name).eval()
    folder = model_card.save_tokenizer_folder(
        tokenizer,
        tmp_path / "published",
        metrics={"rfid": 12.5, "lpips": 0.1, "ssim": 0.9, "psnr": 27.0},
        usage={"utilisation": 0.875, "perplexity": 13.2, "dead_codes": 2},
        datasets=["synthetic-faces"],
        repo_id="someone/tokenizer",
    )
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers"
    assert {"vector-quantization", name} <= set(metadata["tags"])
    assert metadata["datasets"] == ["synthetic-faces"]
    assert metadata["metrics"] == ["rfid", "lpips", "ssim", "psnr"]
    for text in (f"codebook size K | {K}", f"code dimension D | {D}", "token grid | 16 x 16", "12.5000",
                 "87.5%", "dead codes | 2", 'from_pretrained("someone/tokenizer")'):
        assert text in card, text
    loaded = VQTokenizer.from_pretrained(folder).eval()
    x = images(seed=9)
    assert torch.equal(loaded.encode(x), tokenizer.encode(x))


def test_push_to_hub_uploads_the_folder_without_printing_the_token(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["exist_ok"]))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, folder_path))
            return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(model_card, "HfApi", FakeApi)
    with pytest.raises(ValueError, match="no config.json"):
        model_card.push_to_hub("me/tok", tmp_path)
    folder = model_card.save_tokenizer_folder(tiny_tokenizer(), tmp_path / "tok")
    url = model_card.push_to_hub("me/tok", folder, token="hf_secret_value")
    assert url == "https://hub/me/tok/commit/1"
    assert calls[-3:] == [("init", "hf_secret_value"), ("create_repo", "me/tok", True),
                          ("upload_folder", "me/tok", str(folder))]
    captured = capsys.readouterr()
    assert "hf_secret_value" not in captured.out + captured.err
