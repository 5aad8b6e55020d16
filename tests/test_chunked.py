"""train/chunked.py: chunked losses equal the unchunked ones and never hold all positions' logits."""

from __future__ import annotations

import pytest
import torch

from train.chunked import chunked_cross_entropy, chunked_divergence, chunked_topk_divergence
from train.losses import (
    cross_entropy,
    per_token_divergence,
    reduce_tokens,
    topk_per_token_divergence,
)

torch.set_num_threads(1)
F64 = torch.float64
B, T, H, HT, V, VT, K = 3, 5, 4, 6, 11, 13, 4


def setup(seed: int = 0, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(B, T, HT, generator=g, dtype=dtype)
    teacher_weight = torch.randn(VT, HT, generator=g, dtype=dtype)  # padded: VT > V
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0, 0] = mask[2, 4] = True
    return hidden, weight, teacher_hidden, teacher_weight, mask


def grads(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_chunked_divergence_equals_unchunked(kind: str, beta: float, chunk_size: int) -> None:
    h, w, th, tw, mask = setup()
    kw = {"kind": kind, "beta": beta, "temperature": 1.3}
    got = chunked_divergence(h, w, th, tw, mask, chunk_size=chunk_size, vocab_limit=V, **kw)
    want = per_token_divergence(h @ w.T, th @ tw.T, mask, vocab_limit=V, **kw)
    close(got, want)
    assert (got[~mask] == 0).all()
    n = int(mask.sum()) + 3  # as if other micro-batches had 3 more target tokens
    for a, b in zip(
        grads(reduce_tokens(got, mask, n), h, w),
        grads(reduce_tokens(want, mask, n), h, w),
        strict=True,
    ):
        close(a, b)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind,beta", CASES)
def test_chunked_topk_equals_unchunked(kind: str, beta: float, tail: bool) -> None:
    h, w, th, tw, mask = setup()
    t_logits = (th @ tw.T)[..., :V]
    ids = t_logits.topk(K, dim=-1).indices
    lp = torch.log_softmax(th @ tw.T, -1).gather(-1, ids)  # over the padded vocab, like a server
    kw = {"kind": kind, "beta": beta, "temperature": 0.8, "tail": tail}
    got = chunked_topk_divergence(h, w, ids, lp, mask, chunk_size=2, **kw)
    want = topk_per_token_divergence(h @ w.T, ids, lp, mask, **kw)
    close(got, want)
    for a, b in zip(grads(got.sum(), h, w), grads(want.sum(), h, w), strict=True):
        close(a, b)


def test_chunked_cross_entropy_equals_unchunked() -> None:
    h, w, _, _, mask = setup()
    y = torch.randint(0, V - 2, (B, T), generator=torch.Generator().manual_seed(1))
    got = chunked_cross_entropy(h, w, y, mask, chunk_size=4, vocab_limit=V - 2)
    want = cross_entropy(h @ w.T, y, mask, vocab_limit=V - 2)
    close(got, want)
    for a, b in zip(grads(got.sum(), h, w), grads(want.sum(), h, w), strict=True):
        close(a, b)


def test_vocab_mismatch_without_limit_raises() -> None:
    h, w, th, tw, mask = setup()
    with pytest.raises(ValueError, match="vocab_limit"):
        chunked_divergence(h, w, th, tw, mask, kind="reverse_kl")
    with pytest.raises(ValueError, match="vocab_limit"):
        chunked_divergence(h, w, th, tw, mask, kind="reverse_kl", vocab_limit=V + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(h, w, th, tw, mask, kind="reverse_kl", vocab_limit=V, chunk_size=0)


def test_empty_mask_gives_zero_and_zero_grads() -> None:
    h, w, th, tw, _ = setup()
    empty = torch.zeros(B, T, dtype=torch.bool)
    ids = torch.zeros(B, T, K, dtype=torch.long)
    for per_token in (
        chunked_divergence(h, w, th, tw, empty, kind="jsd", vocab_limit=V),
        chunked_topk_divergence(h, w, ids, torch.zeros(B, T, K, dtype=F64), empty, kind="jsd"),
        chunked_cross_entropy(h, w, ids[..., 0], empty),
    ):
        loss = reduce_tokens(per_token, empty)
        assert loss.item() == 0.0
        for g in grads(loss, h, w):
            assert (g == 0).all()


def test_teacher_gets_no_gradient() -> None:
    h, w, th, tw, mask = setup()
    th.requires_grad_()
    out = chunked_divergence(h, w, th, tw, mask, kind="forward_kl", vocab_limit=V)
    out.sum().backward()
    assert th.grad is None and w.grad is not None


def test_backward_keeps_no_positions_by_vocab_tensor() -> None:
    """What autograd saves for backward: chunk inputs only, never an [N, V] logits tensor."""
    g = torch.Generator().manual_seed(0)
    n_pos, vocab = 64, 50
    h = torch.randn(1, n_pos, 8, generator=g, requires_grad=True)
    w = torch.randn(vocab, 8, generator=g, requires_grad=True)
    th, tw = torch.randn(1, n_pos, 8, generator=g), torch.randn(vocab, 8, generator=g)
    mask = torch.ones(1, n_pos, dtype=torch.bool)

    def largest_saved(fn) -> int:
        sizes: list[int] = []

        def pack(x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return max(sizes)

    naive = largest_saved(lambda: per_token_divergence(h @ w.T, th @ tw.T, mask, kind="reverse_kl"))
    chunked = largest_saved(
        lambda: chunked_divergence(h, w, th, tw, mask, kind="reverse_kl", chunk_size=8)
    )
    assert naive >= n_pos * vocab
    assert chunked < 8 * vocab + n_pos * 8 + vocab * 8
