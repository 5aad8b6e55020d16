"""train/chunked.py and train/fused.py: chunked losses equal the unchunked ones (value and
gradient) and never hold all positions' logits."""

from __future__ import annotations

import pytest
import torch

from train.chunked import chunked_cross_entropy, chunked_divergence, chunked_topk_divergence
from train.fused import (
    chunked_cross_entropy_loss,
    chunked_divergence_loss,
    chunked_topk_divergence_loss,
)
from train.losses import (
    cross_entropy,
    per_token_divergence,
    reduce_tokens,
)
from train.topk_losses import topk_per_token_divergence

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


# ---- Fused reduced losses: value and gradient made in forward == the per-token path reduced ----


def step_weight(mask: torch.Tensor, extra: int = 3) -> tuple[float, int]:
    """1/N and N, N = this batch's target tokens plus `extra` from other micro-batches."""
    n = int(mask.sum()) + extra
    return 1.0 / max(n, 1), n


def check_fused(fused, unfused: torch.Tensor, mask: torch.Tensor, n: int, *xs) -> None:
    """Fused (loss, per_token) == (reduce_tokens(unfused, mask, n), unfused), and their grads."""
    close(fused.per_token, unfused.detach())
    assert (fused.per_token[~mask] == 0).all() and not fused.per_token.requires_grad
    want = reduce_tokens(unfused, mask, n)
    close(fused.loss, want)
    for a, b in zip(grads(fused.loss, *xs), grads(want, *xs), strict=True):
        close(a, b)


@pytest.mark.parametrize("vocab_limit", [V, V - 3])
@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_fused_divergence_equals_unfused(
    kind: str, beta: float, chunk_size: int, vocab_limit: int
) -> None:
    h, w, th, tw, mask = setup()
    kw = {"kind": kind, "beta": beta, "temperature": 1.3, "vocab_limit": vocab_limit}
    wt, n = step_weight(mask)
    got = chunked_divergence_loss(h, w, th, tw, mask, wt, chunk_size=chunk_size, **kw)
    check_fused(got, per_token_divergence(h @ w.T, th @ tw.T, mask, **kw), mask, n, h, w)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_topk_equals_unfused(kind: str, beta: float, tail: bool) -> None:
    h, w, th, tw, mask = setup()
    vocab = V - 2
    ids = (th @ tw.T)[..., :vocab].topk(K, dim=-1).indices
    lp = torch.log_softmax(th @ tw.T, -1).gather(-1, ids)
    if kind == "forward_kl" or (kind == "jsd" and beta < 1):  # finite with p_t = 0 somewhere
        lp[1, :, -1] = -torch.inf  # a processed top-k logprob
    kw = {"kind": kind, "beta": beta, "temperature": 0.8, "tail": tail, "vocab_limit": vocab}
    wt, n = step_weight(mask)
    got = chunked_topk_divergence_loss(h, w, ids, lp, mask, wt, chunk_size=2, **kw)
    check_fused(got, topk_per_token_divergence(h @ w.T, ids, lp, mask, **kw), mask, n, h, w)


@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_topk_with_candidates_not_stored_equals_unfused(kind: str, beta: float) -> None:
    """Scores with a per-position k: a +inf logprob (a candidate not stored) is left out of both
    sides by the fused gradient exactly as by autograd through the unfused loss."""
    h, w, th, tw, mask = setup()
    ids = (th @ tw.T)[..., : V - 2].topk(K, dim=-1).indices
    lp = torch.log_softmax(th @ tw.T, -1).gather(-1, ids)
    counts = torch.randint(1, K + 1, lp.shape[:-1], generator=torch.Generator().manual_seed(3))
    lp = torch.where(torch.arange(K) < counts[..., None], lp, torch.inf)
    kw = {"kind": kind, "beta": beta, "temperature": 0.8, "tail": True, "vocab_limit": V - 2}
    wt, n = step_weight(mask)
    got = chunked_topk_divergence_loss(h, w, ids, lp, mask, wt, chunk_size=2, **kw)
    check_fused(got, topk_per_token_divergence(h @ w.T, ids, lp, mask, **kw), mask, n, h, w)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_cross_entropy_equals_unfused(temperature: float) -> None:
    h, w, _, _, mask = setup()
    y = torch.randint(0, V - 2, (B, T), generator=torch.Generator().manual_seed(1))
    y[~mask] = -100  # labels off the mask are never read
    kw = {"temperature": temperature, "vocab_limit": V - 2}
    wt, n = step_weight(mask)
    got = chunked_cross_entropy_loss(h, w, y, mask, wt, chunk_size=4, **kw)
    check_fused(got, cross_entropy(h @ w.T, y, mask, **kw), mask, n, h, w)


def test_fused_takes_per_token_weights_and_scales_with_grad_output() -> None:
    """A [B, T] weight tensor weighs each token; backward of c·loss gives c times the gradient."""
    h, w, th, tw, mask = setup()
    wt = torch.rand(B, T, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = chunked_divergence_loss(h, w, th, tw, mask, wt, kind="reverse_kl", vocab_limit=V)
    want = wt * per_token_divergence(h @ w.T, th @ tw.T, mask, kind="reverse_kl", vocab_limit=V)
    close(got.loss, want.sum())
    for a, b in zip(grads(2.5 * got.loss, h, w), grads(2.5 * want.sum(), h, w), strict=True):
        close(a, b)
    with pytest.raises(ValueError, match="token_weight"):
        chunked_divergence_loss(h, w, th, tw, mask, wt[0], kind="reverse_kl", vocab_limit=V)


def fused_losses(h, w, th, tw, mask, wt: float = 0.25):
    ids = torch.zeros(B, T, K, dtype=torch.long)
    return (
        chunked_divergence_loss(h, w, th, tw, mask, wt, kind="jsd", vocab_limit=V),
        chunked_topk_divergence_loss(
            h, w, ids, torch.zeros(B, T, K, dtype=F64), mask, wt, kind="jsd"
        ),
        chunked_cross_entropy_loss(h, w, ids[..., 0], mask, wt),
    )


def test_fused_empty_mask_gives_zero_and_zero_grads() -> None:
    h, w, th, tw, _ = setup()
    empty = torch.zeros(B, T, dtype=torch.bool)
    for got in fused_losses(h, w, th, tw, empty):
        assert got.loss.item() == 0.0 and (got.per_token == 0).all()
        for g in grads(got.loss, h, w):
            assert (g == 0).all()


def test_fused_gradient_only_where_needed() -> None:
    """Teacher: never; frozen lm_head (LoRA): hidden only; no_grad: values only, no graph."""
    h, w, th, tw, mask = setup()
    th.requires_grad_()
    got = chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="forward_kl", vocab_limit=V)
    got.loss.backward()
    assert th.grad is None and w.grad is not None and h.grad is not None
    frozen = w.detach()
    want = per_token_divergence(h @ frozen.T, th @ tw.T, mask, kind="forward_kl", vocab_limit=V)
    got = chunked_divergence_loss(h, frozen, th, tw, mask, 1.0, kind="forward_kl", vocab_limit=V)
    close(grads(got.loss, h)[0], grads(want.sum(), h)[0])
    with torch.no_grad():
        no_grad = fused_losses(h, w, th, tw, mask)
    for got, want in zip(no_grad, fused_losses(h, w, th, tw, mask), strict=True):
        assert not got.loss.requires_grad
        close(got.loss, want.loss.detach())
        close(got.per_token, want.per_token)
    for got in fused_losses(h.detach(), w.detach(), th, tw, mask):
        assert not got.loss.requires_grad


def test_fused_under_bf16_autocast_matches_unfused() -> None:
    """Mixed precision: bf16 logits matmuls as in the per-token path, float32 grads out."""
    h, w, th, tw, mask = setup(dtype=torch.float32)
    wt, n = step_weight(mask)
    kw = {"kind": "reverse_kl", "temperature": 1.3, "vocab_limit": V}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_divergence_loss(h, w, th, tw, mask, wt, **kw)
        want = reduce_tokens(chunked_divergence(h, w, th, tw, mask, **kw), mask, n)
    got_grads, want_grads = grads(got.loss, h, w), grads(want, h, w)
    close(got.loss, want, tol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert a.dtype == torch.float32
        close(a, b, tol=2e-2)


def test_fused_argument_errors() -> None:
    h, w, th, tw, mask = setup()
    with pytest.raises(ValueError, match="vocab_limit"):
        chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="reverse_kl")
    with pytest.raises(ValueError, match="vocab_limit"):
        chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="reverse_kl", vocab_limit=V + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_loss(h, w, mask.long(), mask, 1.0, chunk_size=0)
    with pytest.raises(ValueError, match="kind"):
        chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="kl", vocab_limit=V)
    with pytest.raises(ValueError, match="beta"):
        chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="jsd", beta=1.5, vocab_limit=V)
    with pytest.raises(ValueError, match="temperature"):
        chunked_cross_entropy_loss(h, w, mask.long(), mask, 1.0, temperature=0.0)


def test_fused_backward_keeps_no_positions_by_vocab_tensor() -> None:
    """Saved for backward: the two gradients, hidden- and weight-sized, never [N, V] logits."""
    g = torch.Generator().manual_seed(0)
    n_pos, vocab, dim = 64, 50, 8
    h = torch.randn(1, n_pos, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    th, tw = torch.randn(1, n_pos, dim, generator=g), torch.randn(vocab, dim, generator=g)
    mask = torch.ones(1, n_pos, dtype=torch.bool)
    sizes: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked_divergence_loss(h, w, th, tw, mask, 1.0, kind="reverse_kl", chunk_size=8)
    assert max(sizes) <= max(n_pos * dim, vocab * dim) < n_pos * vocab
