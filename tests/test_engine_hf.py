"""The hf engine on a real tiny Qwen3 (random weights): decoding, sampling, scoring, batching.

A random model's greedy output is deterministic, which is all these tests need. The weights
are re-drawn with a larger spread than the default init (std 0.02 makes a random model repeat
one token forever) and the end-of-turn row is scaled up so that some rows stop early at
different steps while others run to ``max_tokens``: left padding, pruning of finished rows
and both finish reasons are all exercised in one batch.

Exactness: batched and one-at-a-time greedy decoding agree token for token in float32 here;
padding changes matmul shapes and hence float rounding, but the logit gaps of this random
model are far larger than that noise.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from data.answers import format_prompt
from engines.base import Completion, GenerationParams
from engines.hf import HFEngine
from world import build_problems, corpus_texts
from world.config import TinyModelConfig, build_tiny_model
from world.tokenizer import train_tokenizer

TINY = TinyModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)
MAX_TOKENS = 40


def varied(model: torch.nn.Module, eos: int, std: float = 0.3, eos_scale: float = 3.0) -> None:
    """Re-draw every matrix with ``std`` and scale the (tied) end-of-turn row, in place."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.get_input_embeddings().weight[eos] *= eos_scale


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return build_problems(0, 200, 20, 0)


@pytest.fixture(scope="module")
def tok(records: list[dict]):
    return train_tokenizer(corpus_texts(records), vocab_size=1024)


@pytest.fixture(scope="module")
def eos(tok) -> int:
    return tok.eos_token_id


@pytest.fixture(scope="module")
def model(tok, eos: int) -> torch.nn.Module:
    m = build_tiny_model(tok, TINY).eval()
    varied(m, eos)
    return m


@pytest.fixture(scope="module")
def prompts(tok, records: list[dict]) -> list[list[int]]:
    """Six chat prompts of 27 to 67 tokens."""
    out = [tok.encode(format_prompt(r["prompt"])) for r in records[::37]]
    assert len({len(p) for p in out}) == len(out)
    return out


@pytest.fixture(scope="module")
def engine(model: torch.nn.Module, tok) -> HFEngine:
    return HFEngine(model, tok)


@pytest.fixture(scope="module")
def greedy(eos: int) -> GenerationParams:
    return GenerationParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=(eos,))


def ids(out: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in row] for row in out]


def reasons(out: list[list[Completion]]) -> list[list[str]]:
    return [[c.finish_reason for c in row] for row in out]


# -- greedy decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [True, False], ids=["stop-eos", "no-stop"])
def test_cache_matches_recompute(model, tok, prompts, eos, stop: bool) -> None:
    """KV-cached decoding (with left padding and pruning) = recomputing the prefix each step."""
    params = GenerationParams(
        temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=(eos,) if stop else ()
    )
    cached = HFEngine(model, tok).generate(prompts, params)
    reference = HFEngine(model, tok, use_cache=False).generate(prompts, params)
    assert ids(cached) == ids(reference)
    assert reasons(cached) == reasons(reference)
    lengths = [len(c.token_ids) for row in cached for c in row]
    if stop:  # rows finish at different steps, so pruning happened mid-batch
        assert len(set(lengths)) >= 4 and max(lengths) == MAX_TOKENS
    else:
        assert set(lengths) == {MAX_TOKENS}


def test_cache_matches_recompute_when_sampling(model, tok, prompts, eos) -> None:
    """Both paths draw the same random numbers in the same order."""
    params = GenerationParams(temperature=1.0, max_tokens=24, seed=3, stop_token_ids=(eos,))
    cached = HFEngine(model, tok).generate(prompts, params)
    reference = HFEngine(model, tok, use_cache=False).generate(prompts, params)
    assert ids(cached) == ids(reference)


def test_batched_equals_one_at_a_time(model, tok, engine, prompts, greedy) -> None:
    """Padding and batch composition do not change greedy results."""
    batched = engine.generate(prompts, greedy)
    single = [engine.generate([p], greedy)[0] for p in prompts]
    assert ids(batched) == ids(single)
    in_pairs = HFEngine(model, tok, batch_size=2).generate(prompts, greedy)
    assert ids(in_pairs) == ids(batched)


def test_finish_reasons_and_text(tok, engine, prompts, greedy, eos) -> None:
    out = engine.generate(prompts, greedy)
    kinds = set()
    for row in out:
        c = row[0]
        kinds.add(c.finish_reason)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
            assert c.text == tok.decode(c.token_ids[:-1])
            assert tok.eos_token not in c.text
        else:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == MAX_TOKENS and eos not in c.token_ids
            assert c.text == tok.decode(c.token_ids)
    assert kinds == {"stop", "length"}


def test_max_tokens_one(engine, prompts, greedy) -> None:
    params = GenerationParams(temperature=0, max_tokens=1)
    out = engine.generate(prompts, params)
    first = [row[0].token_ids[0] for row in engine.generate(prompts, greedy)]
    assert [row[0].token_ids for row in out] == [[t] for t in first]
    assert all(row[0].finish_reason == "length" for row in out)


def test_empty_inputs(engine, greedy) -> None:
    assert engine.generate([], greedy) == []
    assert engine.score([], [], top_k=3) == []
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[5, 6], []], greedy)


def test_params_are_checked() -> None:
    for bad in ({"n": 0}, {"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            GenerationParams(**bad)
    assert GenerationParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)  # type: ignore[arg-type]


# -- sampling ---------------------------------------------------------------------------------
def test_n_samples_seeded(engine, prompts) -> None:
    params = GenerationParams(n=3, temperature=1.5, max_tokens=20, seed=7)
    out = engine.generate(prompts, params)
    assert len(out) == len(prompts)
    for p, row in enumerate(out):
        assert [(c.prompt_index, c.sample_idx) for c in row] == [(p, 0), (p, 1), (p, 2)]
        assert len({tuple(c.token_ids) for c in row}) > 1  # samples of one prompt differ
    assert ids(engine.generate(prompts, params)) == ids(out)
    other = engine.generate(prompts, GenerationParams(n=3, temperature=1.5, max_tokens=20, seed=8))
    differing = sum(a != b for a, b in zip(ids(other), ids(out), strict=True))
    assert differing == len(prompts)


def test_temperature_zero_samples_are_greedy(engine, prompts, greedy) -> None:
    n3 = GenerationParams(
        n=3, temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=greedy.stop_token_ids
    )
    out = engine.generate(prompts, n3)
    one = engine.generate(prompts, greedy)
    for row, ref in zip(out, one, strict=True):
        assert [c.token_ids for c in row] == [ref[0].token_ids] * 3


def test_tiny_top_p_is_greedy(engine, prompts, greedy) -> None:
    params = GenerationParams(
        n=2,
        temperature=1.0,
        top_p=1e-6,
        max_tokens=MAX_TOKENS,
        stop_token_ids=greedy.stop_token_ids,
    )
    one = ids(engine.generate(prompts, greedy))
    assert ids(engine.generate(prompts, params)) == [[r[0], r[0]] for r in one]


def test_sampler_frequencies(engine) -> None:
    """Inverse-CDF draws follow softmax(logits / T) and top-p; padding rows are never drawn."""
    v = engine.vocab_limit
    logits = torch.full((20000, v + 34), -torch.inf)
    logits[:, v:] = 1e4  # padding rows past len(tokenizer): must be sliced off
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits[:, 5:9] = probs.log() * 2.0  # at temperature 2 these are exactly `probs`
    gen = torch.Generator().manual_seed(0)
    draws = engine._pick(logits, GenerationParams(temperature=2.0), gen)
    freq = torch.bincount(draws, minlength=v)[5:9].double() / len(draws)
    assert int(torch.bincount(draws, minlength=v).sum()) == len(draws) and draws.max() < v
    assert torch.allclose(freq, probs.double(), atol=0.015)
    # top_p 0.6 keeps 0.5 (mass before it 0) and 0.3 (before it 0.5 <= 0.6): 5/8 and 3/8
    draws = engine._pick(logits, GenerationParams(temperature=2.0, top_p=0.6), gen)
    freq = torch.bincount(draws, minlength=v)[5:9].double() / len(draws)
    assert torch.allclose(
        freq, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.double), atol=0.015
    )


# -- scoring ----------------------------------------------------------------------------------
def reference_scores(model, prompt: list[int], target: list[int], vocab: int) -> torch.Tensor:
    """Log-softmax of one unpadded forward pass at positions P-1 .. P+T-2."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, :, :vocab]
    p = len(prompt)
    return torch.log_softmax(logits[p - 1 : p + len(target) - 1].float(), dim=-1)


def test_score_matches_full_forward(model, tok, engine, prompts) -> None:
    targets = [prompts[5][:n] for n in (1, 7, 15, 30, 0)] + [prompts[0][3:20]]
    pr = [prompts[i] for i in (0, 1, 2, 3, 4, 2)]
    k = 8
    out = engine.score(pr, targets, top_k=k)
    assert len(out) == len(pr)
    for p, t, s in zip(pr, targets, out, strict=True):
        ref = reference_scores(model, p, t, len(tok))
        vals, idx = ref.topk(k, dim=-1)
        assert s.topk_ids.shape == (len(t), k) and s.topk_ids.dtype == np.int32
        assert s.topk_logprobs.dtype == np.float32 and s.target_logprobs.shape == (len(t),)
        np.testing.assert_array_equal(s.topk_ids, idx.numpy())
        np.testing.assert_allclose(s.topk_logprobs, vals.numpy(), atol=1e-5)
        expected = ref.gather(-1, torch.tensor(t, dtype=torch.long)[:, None]).squeeze(-1)
        np.testing.assert_allclose(s.target_logprobs, expected.numpy(), atol=1e-5)
    # one row per batch: no padding at all, same numbers
    alone = HFEngine(model, tok, batch_size=1).score(pr, targets, top_k=k)
    for a, b in zip(alone, out, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)


def test_score_top_k_clamped_to_tokenizer(tok, engine, prompts) -> None:
    (s,) = engine.score([prompts[0]], [prompts[1][:5]], top_k=10**6)
    assert s.topk_ids.shape == (5, len(tok))
    assert sorted(s.topk_ids[0].tolist()) == list(range(len(tok)))
    mass = np.logaddexp.reduce(s.topk_logprobs.astype(np.float64), axis=-1)
    np.testing.assert_allclose(mass, 0.0, atol=1e-4)  # normalised over the tokenizer's vocab
    assert np.all(np.diff(s.topk_logprobs, axis=-1) <= 0)


def test_padding_rows_never_returned(model, tok, prompts, eos) -> None:
    """Even when the padded vocab rows would win every argmax, no id >= len(tokenizer) leaks."""
    m = copy.deepcopy(model)
    vocab = len(tok)
    assert m.config.vocab_size > vocab
    emb = m.get_input_embeddings().weight
    assert m.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied
    with torch.no_grad():
        emb[vocab:] = 50.0 * torch.randn(emb.shape[0] - vocab, emb.shape[1])
        raw = m(input_ids=torch.tensor([prompts[0]])).logits[0]
    assert bool((raw.argmax(-1) >= vocab).all())  # the test bites: unsliced, padding wins
    eng = HFEngine(m, tok)
    cases = [
        GenerationParams(temperature=0, max_tokens=16, stop_token_ids=(eos,)),
        GenerationParams(n=2, temperature=1.0, max_tokens=16, seed=1),
        GenerationParams(n=2, temperature=5.0, top_p=0.9, max_tokens=16, seed=2),
    ]
    for params in cases:
        for row in eng.generate(prompts, params):
            for c in row:
                assert max(c.token_ids) < vocab
    scores = eng.score(
        prompts[:3], [prompts[3][:9], prompts[4][:2], prompts[5][:4]], top_k=vocab + 50
    )
    for s in scores:
        assert s.topk_ids.shape[1] == vocab and int(s.topk_ids.max()) < vocab
        assert np.isfinite(s.target_logprobs).all()


# -- memory bound and progress ----------------------------------------------------------------
class ShapeRecorder:
    """A forward pre-hook that records (rows, width) of every model call's attention mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        rows, width = kwargs["attention_mask"].shape
        self.shapes.append((rows, width))

    def __enter__(self) -> ShapeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("use_cache", [True, False])
def test_batches_respect_token_budget(model, tok, prompts, greedy, use_cache: bool) -> None:
    budget, batch_size, new = 300, 3, 20
    eng = HFEngine(model, tok, batch_size=batch_size, max_batch_tokens=budget, use_cache=use_cache)
    params = GenerationParams(
        n=2, temperature=0, max_tokens=new, stop_token_ids=greedy.stop_token_ids
    )
    with ShapeRecorder(model) as rec:
        out = eng.generate(prompts, params)
    assert rec.shapes and all(r * w <= budget and r <= batch_size for r, w in rec.shapes)
    starts = [s for s in rec.shapes if s[1] <= max(map(len, prompts))]  # prefill calls
    assert len(starts) >= 4  # 12 rows of up to 87 tokens cannot fit in fewer batches
    assert ids(out) == ids(HFEngine(model, tok).generate(prompts, params))

    targets = [prompts[(i + 1) % 6][:20] for i in range(6)]
    with ShapeRecorder(model) as rec:
        scores = eng.score(prompts, targets, top_k=4)
    assert len(rec.shapes) == 2 and all(r * w <= budget and r <= batch_size for r, w in rec.shapes)
    ref = HFEngine(model, tok).score(prompts, targets, top_k=4)
    for a, b in zip(scores, ref, strict=True):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)


def test_progress_reports_prompts(model, tok, prompts) -> None:
    eng = HFEngine(model, tok, batch_size=3)
    calls: list[tuple[int, int]] = []
    eng.generate(
        prompts,
        GenerationParams(n=2, max_tokens=4, seed=0),
        progress=lambda d, t: calls.append((d, t)),
    )
    done = [d for d, _ in calls]
    assert len(calls) == 4 and {t for _, t in calls} == {len(prompts)}
    assert done == sorted(done) and done[0] > 0 and done[-1] == len(prompts)
    calls.clear()
    eng.score(
        prompts, [p[:3] for p in prompts], top_k=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls == [(3, 6), (6, 6)]


# -- GPU ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu(model, tok, prompts, greedy, eos) -> None:
    """The same engine on a GPU: tensors stay on their devices and results match the CPU's."""
    gpu = copy.deepcopy(model).to("cuda")
    eng, ref = HFEngine(gpu, tok), HFEngine(model, tok)
    assert ids(eng.generate(prompts, greedy)) == ids(ref.generate(prompts, greedy))
    assert ids(HFEngine(gpu, tok, use_cache=False).generate(prompts, greedy)) == ids(
        ref.generate(prompts, greedy)
    )
    params = GenerationParams(
        n=2, temperature=1.0, top_p=0.9, max_tokens=16, seed=4, stop_token_ids=(eos,)
    )
    sampled = eng.generate(prompts, params)
    assert ids(sampled) == ids(eng.generate(prompts, params))
    assert all(max(c.token_ids) < len(tok) for row in sampled for c in row)
    targets = [p[:9] for p in reversed(prompts)]
    for a, b in zip(eng.score(prompts, targets, 5), ref.score(prompts, targets, 5), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-4)
