"""The prior's token layout, config round trip, loss, and that it can learn at all."""

import math

import pytest
import torch
import torch.nn.functional as F

from stage2_prior import PREFIX_LENGTH, ImageTokenPrior, build_prior


def tiny_prior(codebook_size=32, grid_size=(4, 4), num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_prior(codebook_size, grid_size, num_classes, hidden_size=32, num_layers=2, num_heads=2).eval()


@pytest.mark.parametrize("num_classes", [0, 5])
def test_vocabulary_and_context_sizes(num_classes):
    prior = tiny_prior(codebook_size=64, grid_size=(3, 5), num_classes=num_classes)
    cfg = prior.config
    assert cfg.vocab_size == 64 + num_classes + 1
    assert cfg.max_position_embeddings == 15 + PREFIX_LENGTH
    assert prior.get_output_embeddings().weight.shape[0] == 64 + num_classes + 1
    assert prior.null_token_id == 64 + num_classes
    assert prior.special_token_ids == list(range(64, 64 + num_classes + 1))
    assert prior.grid_size == (3, 5) and prior.num_grid_tokens == 15
    # No end token: an eos id inside [0, K) would cut grids short whenever that code was sampled.
    assert cfg.eos_token_id is None


def test_conditioning_tokens_layout():
    prior = tiny_prior(codebook_size=10, num_classes=3)
    tokens = prior.conditioning_tokens(torch.tensor([0, 2, -1]), 3)
    assert tokens.tolist() == [[10], [12], [13]]
    assert prior.conditioning_tokens(None, 2).tolist() == [[13], [13]]
    grids = torch.arange(16).reshape(1, 4, 4) % 10
    seq = prior.token_sequences(grids, torch.tensor([1]))
    assert seq.tolist() == [[11] + (torch.arange(16) % 10).tolist()]


def test_save_load_round_trip_keeps_config_and_logits(tmp_path):
    prior = tiny_prior(num_classes=3)
    prior.config.tokenizer_hash = "feedbeef"
    prior.save_pretrained(tmp_path)
    loaded = ImageTokenPrior.from_pretrained(tmp_path).eval()
    assert loaded.config.codebook_size == 32
    assert loaded.grid_size == (4, 4)
    assert loaded.num_classes == 3
    assert loaded.config.tokenizer_hash == "feedbeef"
    ids = prior.token_sequences(torch.randint(0, 32, (2, 4, 4)), torch.tensor([0, 2]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, prior(ids).logits, rtol=0, atol=0)


def test_grid_loss_is_cross_entropy_over_codes_only():
    prior = tiny_prior(num_classes=2)
    grids = torch.randint(0, 32, (3, 4, 4))
    labels = torch.tensor([0, 1, -1])
    with torch.no_grad():
        loss = prior.grid_loss(grids, labels)
        ids = prior.token_sequences(grids, labels)
        logits = prior(ids).logits
    # Position t predicts token t + 1; the conditioning token (position 0) is never a target.
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"codebook_size": 1}, "codebook_size"),
        ({"grid_size": (4,)}, "grid_size"),
        ({"grid_size": (0, 4)}, "grid_size"),
        ({"num_classes": -1}, "num_classes"),
        ({"hidden_size": 30, "num_heads": 4}, "multiple"),
        ({"size": "huge"}, "size"),
    ],
)
def test_build_prior_rejects_bad_arguments(kwargs, message):
    args = {"codebook_size": 16, "grid_size": (4, 4), "hidden_size": 32, "num_layers": 1, "num_heads": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_prior(**args)


def test_token_sequences_reject_foreign_tokens():
    prior = tiny_prior()
    with pytest.raises(ValueError, match="codes per grid"):
        prior.token_sequences(torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        prior.token_sequences(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="unconditional"):
        prior.token_sequences(torch.zeros(1, 4, 4, dtype=torch.long), torch.tensor([0]))


def test_tiny_prior_learns_a_structured_distribution():
    # Grids whose codes count up from a random start: the first code is uniform (log K nats), the other
    # 15 are determined by it, so the achievable mean loss is log K / 16; uniform guessing scores log K.
    k = 32
    prior = tiny_prior(codebook_size=k).train()
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        start = torch.randint(0, k, (32, 1), generator=gen)
        grids = (start + torch.arange(16)) % k
        loss = prior.grid_loss(grids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.35 * math.log(k), f"loss {loss.item():.3f} vs uniform {math.log(k):.3f}"
