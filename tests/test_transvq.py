"""TransVQ: every code moves every step, eval caching and export, linear attention, O(K) memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stage1_tokenizer.quantizers import QUANTIZERS, build_quantizer
from stage1_tokenizer.quantizers.base import squared_distances
from stage1_tokenizer.quantizers.transvq import TransVQ, feature_map, linear_attention


def small_transvq(seed: int = 0, codebook_size: int = 64, dim: int = 8, width: int = 32) -> TransVQ:
    torch.manual_seed(seed)
    return build_quantizer("transvq", codebook_size=codebook_size, dim=dim, width=width)


def count_transformer_calls(quantizer: TransVQ) -> list[int]:
    calls = [0]
    quantizer.transformer.register_forward_hook(lambda module, args, output: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_registered():
    assert QUANTIZERS["transvq"] is TransVQ


def test_one_adam_step_moves_every_code_even_unselected_ones():
    q = small_transvq()
    z = torch.randn(1, 8, 2, 2)  # 4 latents: at most 4 of the 64 codes are selected
    before = q.export_codebook()
    out = q(z)
    assert out.indices.unique().numel() <= 4
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-3)
    out.loss.backward()
    optimizer.step()
    moved = (q.export_codebook() - before).norm(dim=1)
    assert (moved > 1e-5).all(), f"{int((moved <= 1e-5).sum())} codes did not move"


def test_gradients_reach_only_the_transformer():
    q = small_transvq()
    base_before = q.base_codebook.clone()
    assert not q.base_codebook.requires_grad
    assert all(p is not q.base_codebook for p in q.parameters())
    q(torch.randn(2, 8, 3, 3)).loss.backward()
    assert q.base_codebook.grad is None
    for name, p in q.named_parameters():
        assert name.startswith("transformer."), name
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.Adam(q.parameters(), lr=1e-2).step()
    assert torch.equal(q.base_codebook, base_before)


def test_eval_output_is_a_lookup_in_the_exported_table():
    q = small_transvq().eval()
    z = torch.randn(3, 8, 4, 5)
    out = q(z)
    table = q.export_codebook()
    assert table.shape == (64, 8) and not table.requires_grad and table.grad_fn is None
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = squared_distances(flat, table).argmin(1).view(3, 4, 5)
    assert torch.equal(out.indices, expected)
    assert torch.allclose(out.quantized, table[expected].permute(0, 3, 1, 2), atol=1e-6)
    # A plain VQ table loaded with the export quantizes identically: export costs nothing at inference.
    plain = build_quantizer("vq", codebook_size=64, dim=8).eval()
    plain.embedding.weight.data.copy_(table)
    assert torch.equal(plain(z).indices, out.indices)


def test_export_is_a_copy():
    q = small_transvq().eval()
    table = q.export_codebook()
    table.zero_()
    assert q.codebook.abs().sum() > 0


def test_eval_caches_the_codebook_and_train_drops_the_cache():
    q = small_transvq()
    calls = count_transformer_calls(q)
    z = torch.randn(2, 8, 3, 3)
    q.eval()
    q(z)
    q(z)
    q.embed(torch.zeros(1, 2, 2, dtype=torch.long))
    q.export_codebook()
    assert calls[0] == 1
    q.train()
    q(z)
    assert calls[0] == 2, "training forward must compute the codebook exactly once"
    q(z)
    assert calls[0] == 3, "training must recompute the codebook every forward"
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-2)
    q(z).loss.backward()
    optimizer.step()
    q.eval()
    fresh = q.transformer(q.base_codebook)
    assert torch.allclose(q.codebook, fresh), "eval after training served a stale codebook"


@pytest.mark.parametrize("through_parent", [False, True])
def test_load_state_dict_drops_the_cache(through_parent):
    q, other = small_transvq(seed=0), small_transvq(seed=1)
    q.eval()
    old = q.export_codebook()
    target = other.export_codebook()
    assert not torch.allclose(old, target)
    if through_parent:
        nn.ModuleDict({"quantizer": q}).load_state_dict(nn.ModuleDict({"quantizer": other}).state_dict())
    else:
        q.load_state_dict(other.state_dict())
    assert not q.training
    assert torch.allclose(q.export_codebook(), target)


def test_state_dict_carries_the_base_codebook_not_the_cache():
    q = small_transvq().eval()
    q.codebook
    keys = set(q.state_dict())
    assert "base_codebook" in keys
    assert not any("eval_codebook" in k for k in keys)


def explicit_linear_attention(queries, keys, values):
    """Slow reference: for each query, sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)."""
    out = torch.zeros(queries.shape[0], values.shape[1], dtype=values.dtype)
    for i in range(queries.shape[0]):
        numerator = torch.zeros(values.shape[1], dtype=values.dtype)
        denominator = torch.zeros((), dtype=values.dtype)
        for j in range(keys.shape[0]):
            weight = (feature_map(queries[i]) * feature_map(keys[j])).sum()
            numerator += weight * values[j]
            denominator += weight
        out[i] = numerator / denominator
    return out


def test_linear_attention_matches_explicit_reference():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(9, 5, generator=g, dtype=torch.float64) * 2
    keys = torch.randn(9, 5, generator=g, dtype=torch.float64) * 2
    values = torch.randn(9, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(linear_attention(queries, keys, values), explicit_linear_attention(queries, keys, values))


def test_feature_map_is_elu_plus_one_and_strictly_positive():
    x = torch.linspace(-10, 10, 101, dtype=torch.float64)
    assert torch.allclose(feature_map(x), torch.nn.functional.elu(x) + 1)
    # float32 elu(-30) + 1 rounds to 0; phi must not, or a normaliser can be 0.
    assert (feature_map(torch.tensor([-30.0, -80.0])) > 0).all()


def test_initial_codebook_has_the_base_codebook_scale():
    torch.manual_seed(0)
    q = build_quantizer("transvq", codebook_size=256, dim=64)  # the paper's width, 256
    ratio = q.export_codebook().pow(2).sum(1).mean() / q.base_codebook.pow(2).sum(1).mean()
    assert 0.5 < ratio < 2.0, ratio
    # Distinct codes: the initial map must not collapse the base codebook onto a few points.
    distances = squared_distances(q.export_codebook(), q.export_codebook())
    assert distances[~torch.eye(256, dtype=torch.bool)].min() > 0.05


def test_codebook_is_float32_under_bf16_autocast():
    q = small_transvq()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q.codebook.dtype == torch.float32
        out = q(torch.randn(1, 8, 2, 2))
    assert out.loss.dtype == torch.float32


def test_large_codebook_without_quadratic_memory():
    # K = 65,536: a K x K float32 attention matrix would be 16 GiB; linear attention needs O(K).
    torch.manual_seed(0)
    q = build_quantizer("transvq", codebook_size=65536, dim=8, width=16)
    out = q(torch.randn(2, 8, 4, 4))
    out.loss.backward()
    assert q.codebook.shape == (65536, 8)
    assert torch.isfinite(q.export_codebook()).all()
    assert q.transformer.position.grad.shape == (65536, 16)


@pytest.mark.parametrize("options", [{"width": 0}, {"width": 2.5}, {"width": True}, {"heads": 2}, {"beta": -1.0}])
def test_bad_options_raise_value_error(options):
    with pytest.raises(ValueError):
        build_quantizer("transvq", codebook_size=16, dim=4, **options)
