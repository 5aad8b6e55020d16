"""train/losses.py and train/topk_losses.py against naive references written here with loops and plain softmax formulas."""

from __future__ import annotations

import math

import pytest
import torch

from train.losses import (
    align_vocab,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    per_token_divergence,
    reduce_tokens,
    reverse_kl,
    shift_for_causal_lm,
    target_mask,
)
from train.topk_losses import (
    TAIL_EPS,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_per_token_divergence,
    topk_reverse_kl,
)

torch.set_num_threads(1)
F64 = torch.float64
B, T, V, K = 2, 4, 7, 3
MASK = torch.tensor([[True, True, False, True], [False, True, True, False]])


def logits(seed: int, shape: tuple[int, ...] = (B, T, V), scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).requires_grad_()


# ---- naive references: one position at a time, probabilities, explicit sums ------------------


def ref_softmax(z: torch.Tensor, tau: float) -> torch.Tensor:
    e = torch.exp(z / tau - (z / tau).max())
    return e / e.sum()


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_v p(v) (log p(v) − log q(v)), with a Python loop over v (0·log 0 = 0)."""
    return sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(p.shape[0]) if p[v] > 0)


def ref_div(ps: torch.Tensor, pt: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return ref_kl(pt, ps)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return ref_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)


def ref_per_position(fn, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] tensor of fn(b, t) on masked positions, 0 elsewhere (built without in-place ops)."""
    zero = torch.zeros((), dtype=F64)
    return torch.stack(
        [
            torch.stack([fn(b, t) if mask[b, t] else zero for t in range(mask.shape[1])])
            for b in range(mask.shape[0])
        ]
    )


def ref_full(s, t, mask, kind, beta=0.5, tau=1.0):
    return ref_per_position(
        lambda b, i: ref_div(ref_softmax(s[b, i], tau), ref_softmax(t[b, i], tau), kind, beta), mask
    )


def ref_buckets(s_row, ids, t_logprobs, tau, tail):
    qs, qt = ref_softmax(s_row, 1.0)[ids], torch.exp(t_logprobs)
    if tail:
        qs = torch.cat([qs, (1 - qs.sum()).reshape(1)])
        qt = torch.cat([qt, (1 - qt.sum()).reshape(1)])
    qs, qt = qs ** (1 / tau), qt ** (1 / tau)
    return qs / qs.sum(), qt / qt.sum()


def ref_topk(s, ids, lp, mask, kind, beta=0.5, tau=1.0, tail=False):
    def one(b, i):
        return ref_div(*ref_buckets(s[b, i], ids[b, i], lp[b, i], tau, tail), kind, beta)

    return ref_per_position(one, mask)


def grad(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(y.sum(), x)
    return g


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def topk_teacher(seed: int, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct ids per position and the teacher's τ=1 logprobs on them."""
    t = logits(seed).detach()
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * T)]).view(B, T, k)
    return ids, torch.log_softmax(t, -1).gather(-1, ids)


FULL_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in (0, 0.1, 0.5, 1)]


# ---- full vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", FULL_CASES)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_full_matches_reference(kind: str, beta: float, tau: float) -> None:
    s, t = logits(0), logits(1).detach()
    got = per_token_divergence(s, t, MASK, kind=kind, beta=beta, temperature=tau)
    want = ref_full(s, t, MASK, kind, beta, tau)
    close(got, want)
    close(grad(got, s), grad(want, s))
    assert got.dtype == F64 and (got[~MASK] == 0).all()


def test_named_functions_are_the_kinds() -> None:
    s, t = logits(0), logits(1)
    close(forward_kl(s, t, MASK), per_token_divergence(s, t, MASK, kind="forward_kl"))
    close(reverse_kl(s, t, MASK), per_token_divergence(s, t, MASK, kind="reverse_kl"))
    close(generalized_jsd(s, t, MASK, beta=0.3), ref_full(s, t, MASK, "jsd", 0.3))
    # reverse KL is Σ p_s log(p_s/p_t), not the forward one: they differ on random logits
    assert (forward_kl(s, t, MASK) - reverse_kl(s, t, MASK))[MASK].abs().min() > 1e-3


def test_gradcheck() -> None:
    s, t = logits(0, (1, 2, 5)), logits(1, (1, 2, 5)).detach()
    ids, lp = topk_teacher(3)
    m = torch.ones(1, 2, dtype=torch.bool)
    for f in (
        lambda x: forward_kl(x, t, m, temperature=1.3),
        lambda x: reverse_kl(x, t, m, temperature=0.8),
        lambda x: generalized_jsd(x, t, m, beta=0.3),
    ):
        assert torch.autograd.gradcheck(f, (s,))
    s2 = logits(2)
    assert torch.autograd.gradcheck(
        lambda x: topk_generalized_jsd(x, ids, lp, MASK, beta=0.4, temperature=1.5, tail=True),
        (s2,),
    )


def test_cross_entropy_matches_reference() -> None:
    s = logits(0)
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    y = torch.where(MASK, y, torch.full_like(y, -100))  # ignored positions may hold anything
    got = cross_entropy(s, y, MASK, temperature=1.5)
    want = ref_per_position(lambda b, i: -torch.log(ref_softmax(s[b, i], 1.5)[y[b, i]]), MASK)
    close(got, want)
    close(grad(got, s), grad(want, s))


def test_temperature_applies_to_both_sides() -> None:
    s, t = logits(0), logits(1)
    got = forward_kl(s, t, MASK, temperature=2.0)
    close(got, ref_full(s, t, MASK, "forward_kl", tau=2.0))
    one_sided = ref_per_position(
        lambda b, i: ref_kl(ref_softmax(t[b, i], 1.0), ref_softmax(s[b, i], 2.0)), MASK
    )
    assert (got - one_sided)[MASK].abs().min() > 1e-3


def test_low_precision_inputs_give_float32() -> None:
    s, t = logits(0).detach(), logits(1).detach()
    got = reverse_kl(s.bfloat16(), t.bfloat16(), MASK)
    assert got.dtype == torch.float32
    close(got.double(), reverse_kl(s.bfloat16().double(), t.bfloat16().double(), MASK), 1e-5)


# ---- generalised JSD convention ----------------------------------------------------------------


def test_jsd_endpoints_are_plain_kl() -> None:
    s, t = logits(0), logits(1)
    close(generalized_jsd(s, t, MASK, beta=0.0), forward_kl(s, t, MASK), 0)  # β=0: KL(p_t‖p_s)
    close(generalized_jsd(s, t, MASK, beta=1.0), reverse_kl(s, t, MASK), 0)  # β=1: KL(p_s‖p_t)
    close(generalized_jsd(s, t, MASK, beta=0.0), ref_full(s, t, MASK, "forward_kl"))
    close(generalized_jsd(s, t, MASK, beta=1.0), ref_full(s, t, MASK, "reverse_kl"))


@pytest.mark.parametrize("eps", [1e-4, 1e-6])
def test_jsd_continuity_near_endpoints(eps: float) -> None:
    """The interior → 0 at the endpoints; divided by β (resp. 1−β) it → forward (resp. reverse) KL."""
    s, t = logits(0), logits(1)
    fkl, rkl = forward_kl(s, t, MASK), reverse_kl(s, t, MASK)
    near0 = generalized_jsd(s, t, MASK, beta=eps)
    near1 = generalized_jsd(s, t, MASK, beta=1 - eps)
    close(near0 / eps, fkl, 200 * eps)
    close(near1 / eps, rkl, 200 * eps)
    close(grad(near0 / eps, s), grad(fkl, s), 200 * eps)
    close(grad(near1 / eps, s), grad(rkl, s), 200 * eps)
    # and the raw interior is small there: the jump at β = 0 and 1 is the TRL convention
    assert (near0 <= 2 * eps * fkl).all() and (near1 <= 2 * eps * rkl).all()


def test_jsd_swap_symmetry() -> None:
    s, t = logits(0), logits(1)
    close(generalized_jsd(s, t, MASK, beta=0.5), generalized_jsd(t, s, MASK, beta=0.5))
    close(generalized_jsd(s, t, MASK, beta=0.2), generalized_jsd(t, s, MASK, beta=0.8))
    assert (generalized_jsd(s, t, MASK, beta=0.5)[MASK] <= math.log(2)).all()


# ---- top-k -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", FULL_CASES)
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_topk_matches_reference(kind: str, beta: float, tail: bool, tau: float) -> None:
    s = logits(0)
    ids, lp = topk_teacher(1)
    got = topk_per_token_divergence(
        s, ids, lp, MASK, kind=kind, beta=beta, temperature=tau, tail=tail
    )
    want = ref_topk(s, ids, lp, MASK, kind, beta, tau, tail)
    close(got, want)
    close(grad(got, s), grad(want, s))


def test_topk_named_functions() -> None:
    s = logits(0)
    ids, lp = topk_teacher(1)
    kw = {"temperature": 1.2, "tail": True}
    close(
        topk_forward_kl(s, ids, lp, MASK, **kw), ref_topk(s, ids, lp, MASK, "forward_kl", **_r(kw))
    )
    close(
        topk_reverse_kl(s, ids, lp, MASK, **kw), ref_topk(s, ids, lp, MASK, "reverse_kl", **_r(kw))
    )
    close(
        topk_generalized_jsd(s, ids, lp, MASK, beta=0.3, **kw),
        ref_topk(s, ids, lp, MASK, "jsd", beta=0.3, **_r(kw)),
    )


def _r(kw: dict) -> dict:
    return {"tau": kw["temperature"], "tail": kw["tail"]}


@pytest.mark.parametrize("kind,beta", FULL_CASES)
@pytest.mark.parametrize("tail,tau", [(False, 1.0), (False, 2.0), (True, 1.0), (True, 0.7)])
def test_topk_with_all_ids_equals_full(kind: str, beta: float, tail: bool, tau: float) -> None:
    s, t = logits(0), logits(1).detach()
    g = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(B * T)]).view(B, T, V)
    lp = torch.log_softmax(t, -1).gather(-1, ids)
    got = topk_per_token_divergence(
        s, ids, lp, MASK, kind=kind, beta=beta, temperature=tau, tail=tail
    )
    full = per_token_divergence(s, t, MASK, kind=kind, beta=beta, temperature=tau)
    tol = 10 * TAIL_EPS if tail else 1e-10  # the empty tail bucket is floored at TAIL_EPS
    close(got, full, tol)
    close(grad(got, s), grad(full, s), tol)


# ---- identical student and teacher ---------------------------------------------------------------


@pytest.mark.parametrize("kind,beta", FULL_CASES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_identical_gives_zero_loss_and_grad(kind: str, beta: float, dtype: torch.dtype) -> None:
    tol = 1e-12 if dtype == F64 else 1e-6
    s = logits(0).detach().to(dtype).requires_grad_()
    t = s.detach().clone()
    for tau in (1.0, 0.7):
        got = per_token_divergence(s, t, MASK, kind=kind, beta=beta, temperature=tau)
        close(got, torch.zeros_like(got), tol)
        close(grad(got, s), torch.zeros_like(s), tol)
        ids = t.topk(K, dim=-1).indices
        lp = torch.log_softmax(t, -1).gather(-1, ids)
        for tail in (False, True):
            got = topk_per_token_divergence(
                s, ids, lp, MASK, kind=kind, beta=beta, temperature=tau, tail=tail
            )
            close(got, torch.zeros_like(got), tol)
            close(grad(got, s), torch.zeros_like(s), tol)


# ---- masks, reduction, vocabulary ----------------------------------------------------------------


def test_empty_mask_is_finite_zero_with_zero_grad() -> None:
    s, t = logits(0), logits(1)
    ids, lp = topk_teacher(1)
    empty = torch.zeros(B, T, dtype=torch.bool)
    y = torch.zeros(B, T, dtype=torch.long)
    for per_token in (
        forward_kl(s, t, empty),
        reverse_kl(s, t, empty),
        generalized_jsd(s, t, empty, beta=0.5),
        cross_entropy(s, y, empty),
        topk_generalized_jsd(s, ids, lp, empty, tail=True),
    ):
        for n in (None, 0, torch.tensor(0)):
            loss = reduce_tokens(per_token, empty, n)
            assert loss.item() == 0.0
            (g,) = torch.autograd.grad(loss, s, retain_graph=True)
            assert torch.isfinite(g).all() and (g == 0).all()


def test_reduce_tokens_default_is_masked_mean() -> None:
    per_token = torch.arange(B * T, dtype=F64).view(B, T) + 1
    close(reduce_tokens(per_token, MASK), per_token[MASK].mean())
    close(reduce_tokens(per_token, MASK, 10), per_token[MASK].sum() / 10)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_is_exact(as_tensor: bool) -> None:
    """4 micro-batches divided by the step's token count == one batch of all of them."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 5, 6, generator=g, dtype=F64)
    teacher = torch.randn(8, 5, V, generator=g, dtype=F64)
    mask = torch.rand(8, 5, generator=g) < 0.6
    mask[2] = False  # one sequence with no targets at all
    weight = torch.randn(V, 6, generator=g, dtype=F64, requires_grad=True)

    big = reduce_tokens(reverse_kl(hidden @ weight.T, teacher, mask), mask)
    (big_grad,) = torch.autograd.grad(big, weight)

    n = mask.sum() if as_tensor else int(mask.sum())
    total = torch.zeros((), dtype=F64)
    for i in range(0, 8, 2):
        mb = slice(i, i + 2)
        loss = reduce_tokens(reverse_kl(hidden[mb] @ weight.T, teacher[mb], mask[mb]), mask[mb], n)
        loss.backward()  # accumulates into weight.grad like an optimizer step would
        total = total + loss.detach()
    close(total, big.detach())
    close(weight.grad, big_grad)
    # a per-micro-batch mean would not be the same loss
    means = (
        sum(
            reduce_tokens(
                reverse_kl(hidden[i : i + 2] @ weight.T, teacher[i : i + 2], mask[i : i + 2]),
                mask[i : i + 2],
            )
            for i in range(0, 8, 2)
        )
        / 4
    )
    assert abs(means.item() - big.item()) > 1e-3


def test_vocab_limit_slices_padding_rows() -> None:
    s, t = logits(0, (B, T, 7)), logits(1, (B, T, 9))
    with pytest.raises(ValueError, match="vocab_limit"):
        forward_kl(s, t, MASK)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        got = per_token_divergence(s, t, MASK, kind=kind, vocab_limit=6)
        close(got, per_token_divergence(s[..., :6], t[..., :6], MASK, kind=kind))
    a, b = align_vocab(s, t, 6)
    assert a.shape[-1] == b.shape[-1] == 6
    with pytest.raises(ValueError):
        align_vocab(s, t, 8)
    ids, lp = topk_teacher(1)
    close(
        topk_forward_kl(s, ids.clamp_max(5), lp, MASK, vocab_limit=6),
        topk_forward_kl(s[..., :6], ids.clamp_max(5), lp, MASK),
    )


def test_invalid_arguments_raise() -> None:
    s, t = logits(0), logits(1)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, MASK, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, MASK, temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        per_token_divergence(s, t, MASK, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask"):
        forward_kl(s, t, MASK[:, :2])


def test_target_mask_by_length_keeps_eos_when_pad_is_eos() -> None:
    eos = pad = 9
    # [prompt 3][completion 4 ending in EOS][pad]  and  [prompt 2][completion 2 ending in EOS][pad…]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, eos, pad], [1, 2, 7, eos, pad, pad, pad, pad]])
    mask = target_mask([3, 2], [4, 2], seq_len=8)
    assert mask.tolist() == [
        [False, False, False, True, True, True, True, False],
        [False, False, True, True, False, False, False, False],
    ]
    assert (ids[mask] == eos).sum() == 2  # both final EOS are targets, no pad is
    logits_ = torch.randn(2, 8, 10)
    shifted_logits, targets, loss_mask = shift_for_causal_lm(logits_, ids, mask)
    assert shifted_logits.shape == (2, 7, 10) and loss_mask.shape == (2, 7)
    # position t of the logits predicts token t + 1: the last prompt position predicts the first target
    assert loss_mask[0, 2] and not loss_mask[0, 1] and targets[0, 2] == 4
    assert targets[loss_mask].tolist() == [4, 5, 6, eos, 7, eos]
    assert torch.equal(shifted_logits, logits_[:, :-1])


def test_teacher_minus_inf_counts_as_zero_probability() -> None:
    """Processed teacher logprobs can be −inf outside the sampling support: 0·log 0 = 0, not nan."""
    s, t = logits(0), logits(1).detach().clone()
    t[..., 0] = -math.inf
    finite_t = t.clone()
    finite_t[..., 0] = -1e4  # exp(-1e4) == 0 in float64: the same teacher distribution
    for kind, beta in [("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 0.9)]:
        got = per_token_divergence(s, t, MASK, kind=kind, beta=beta)
        close(got, per_token_divergence(s, finite_t, MASK, kind=kind, beta=beta))
        assert torch.isfinite(grad(got, s)).all()
    # reverse KL is +inf where the student puts mass on an id the teacher rules out: correct, not nan
    assert (reverse_kl(s, t, MASK)[MASK] == math.inf).all()
    ids, lp = topk_teacher(1)
    lp[..., -1] = -math.inf
    got = topk_forward_kl(s, ids, lp, MASK, tail=True, temperature=0.8)
    close(got, ref_topk(s, ids, lp.clamp_min(-1e4), MASK, "forward_kl", tau=0.8, tail=True))
    assert torch.isfinite(grad(got, s)).all()


@pytest.mark.parametrize("kind,beta", FULL_CASES)
@pytest.mark.parametrize("tail,tau", [(False, 1.0), (True, 1.0), (True, 0.7)])
def test_topk_candidates_not_stored_are_left_out_of_both_sides(
    kind: str, beta: float, tail: bool, tau: float
) -> None:
    """Scores kept with a per-position k (score.mass < 1) decode the candidates a position did
    not keep as +inf: the loss is then the naive one over the kept candidates alone (their mass
    in the tail bucket), with finite gradients."""
    s = logits(0)
    ids, lp = topk_teacher(1, k=5)
    counts = torch.tensor([[5, 1, 3, 2], [4, 2, 1, 5]])
    stored = torch.where(torch.arange(5) < counts[..., None], lp, torch.inf)
    got = topk_per_token_divergence(
        s, ids, stored, MASK, kind=kind, beta=beta, temperature=tau, tail=tail
    )

    def one(b: int, i: int) -> torch.Tensor:
        c = int(counts[b, i])
        buckets = ref_buckets(s[b, i], ids[b, i, :c], lp[b, i, :c], tau, tail)
        return ref_div(*buckets, kind, beta)

    want = ref_per_position(one, MASK)
    close(got, want)
    g = grad(got, s)
    assert torch.isfinite(g).all()
    close(g, grad(want, s))
