"""The ``hf`` engine: transformers models in-process, batched, with the KV cache.

Why a hand-written decode loop instead of ``model.generate``: the loop is short,
gives exact control over finish reasons and stop tokens, prunes rows that have
finished from the KV cache (student traces vary 3x in length, so a batch
otherwise decodes padding for most of its life), and draws all randomness from
one ``torch.Generator`` seeded per call, so a resumed shard regenerates exactly
what the killed one would have.

Batches are formed from length-sorted rows and sized so batch x length stays
under ``max_batch_tokens``: memory is bounded by config, not by the data.

The loop keeps per-step host work constant: sampled tokens go into a
preallocated device buffer (one transfer at the end, not a ``.tolist()`` per
step), the attention mask is preallocated and sliced, sampling is an inverse-CDF
lookup (``torch.multinomial`` on CPU costs ~1 ms per step at batch 64, as much
as a tiny model's forward), and without stop tokens no step synchronises with
the device at all (``benchmarks/bench_generate.py`` measures what is left).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.memory import naming_memory
from engines.base import Completion, GenerationParams, Progress, TokenScores
from train.models import load_model, load_tokenizer

log = logging.getLogger("mpd.engines.hf")


# What to change when a batch does not fit in the device's memory.
BATCH_HINT = "lower the engine's max_batch_tokens (or batch_size), or use a bigger device"


def cache_keyword() -> str:
    """The name transformers gives the KV cache, in the forward's arguments and its output.

    transformers 5.2x renamed ``past_key_values`` to ``cache``; the old name still works but
    warns on every decode step, which floods a run's log. Older 5.x only knows the old name.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


class HFEngine:
    """Generation and scoring with one in-process causal LM (plain or PEFT-wrapped)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,  # a transformers tokenizer; untyped to keep transformers out of signatures
        *,
        batch_size: int | None = None,
        max_batch_tokens: int = 32768,
        use_cache: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        # Model rows past len(tokenizer) are padding (vocab rounded up for GPU-friendly
        # shapes): they are never sampled, ranked or normalised over.
        model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.vocab_limit = min(len(tokenizer), model_vocab or len(tokenizer))
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0  # masked out everywhere; any valid id will do
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        self.cache_kw = cache_keyword()

    # -- batching -------------------------------------------------------------
    def _batches(self, lengths: Sequence[int], budget: int) -> list[list[int]]:
        """Row indices grouped longest-first so each batch's padding is small.

        A batch's footprint is rows x (longest row + ``budget`` new tokens); a
        row that alone exceeds ``max_batch_tokens`` runs alone.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            rows = len(current) + 1
            width = max(lengths[current[0]] if current else 0, lengths[i]) + budget
            full = self.batch_size is not None and rows > self.batch_size
            if current and (full or rows * width > self.max_batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _left_pad(
        self, seqs: Sequence[Sequence[int]], extra: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [B, W] and an attention mask [B, W + extra] (extra columns = 1).

        The mask is allocated once with room for ``extra`` generated tokens so the
        decode loop slices it instead of concatenating a column every step.
        """
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.ones((len(seqs), width + extra), dtype=torch.long)
        for row, seq in enumerate(seqs):
            mask[row, : width - len(seq)] = 0
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def _live_model(self) -> torch.nn.Module:
        """The model, for one whole call: each call holds its own reference.

        :meth:`close` runs on the flow's thread while a shard thread may still be decoding
        (a run that stops on another shard's failure): the call in flight keeps the model it
        started with and finishes, instead of calling ``None`` halfway through its loop.
        """
        model = self.model
        if model is None:
            raise RuntimeError("the hf engine was closed: load a new one")
        return model

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """An empty prompt has no position to predict its first token from."""
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")

    # -- generation -----------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, in prompt order; progress counts whole prompts."""
        self._check_prompts(prompts)
        model = self._live_model()
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        lengths = [len(prompts[p]) for p, _ in rows]
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        remaining = [params.n] * len(prompts)  # samples still to finish, per prompt
        done, started = 0, time.monotonic()
        for batch in self._batches(lengths, params.max_tokens):
            seqs = [prompts[rows[i][0]] for i in batch]
            with naming_memory(f"generating {len(seqs)} sequences", self.device, BATCH_HINT):
                decoded = self._decode(model, seqs, params, gen)
            for i, (ids, reason) in zip(batch, decoded, strict=True):
                p, s = rows[i]
                out[p][s] = Completion(p, s, ids, self._text(ids, params), reason)
                remaining[p] -= 1
                done += remaining[p] == 0
            if progress is not None:
                progress(done, len(prompts))
            log.debug(
                "generated %d/%d prompts in %.1fs", done, len(prompts), time.monotonic() - started
            )
        return [[c for c in row if c is not None] for row in out]

    def _text(self, ids: list[int], params: GenerationParams) -> str:
        body = ids[:-1] if ids and ids[-1] in params.stop_token_ids else ids
        return self.tokenizer.decode(body, skip_special_tokens=False)

    def _pick(
        self, logits: torch.Tensor, params: GenerationParams, gen: torch.Generator
    ) -> torch.Tensor:
        """Next token per row: argmax, or a draw from the (top-p truncated) softmax.

        The draw is an inverse-CDF lookup with one uniform per row from ``gen``
        (CPU, so the stream does not depend on the device). ``u`` is scaled by
        the row's total mass and the search is strict (``right=True``), so a
        zero-probability token (past top-p, or underflowed) is never returned.
        """
        logits = logits[:, : self.vocab_limit].float()
        if params.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        order = None
        if params.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            drop = probs.cumsum(-1) - probs > params.top_p  # keep the token crossing p
            probs = probs.masked_fill(drop, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.rand((len(probs), 1), generator=gen).to(cdf.device) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
        # u == total after rounding (p ~ 2^-24): fall back to the most likely token
        idx = torch.where(idx < cdf.shape[-1], idx, probs.argmax(-1))
        return idx if order is None else order.gather(-1, idx[:, None]).squeeze(-1)

    @torch.inference_mode()
    def _decode(
        self,
        model: torch.nn.Module,
        seqs: list[Sequence[int]],
        params: GenerationParams,
        gen: torch.Generator,
    ) -> list[tuple[list[int], str]]:
        """Decode one batch; returns (token ids, finish reason) per row."""
        if not self.use_cache:
            return self._decode_no_cache(model, seqs, params, gen)
        n, steps = len(seqs), params.max_tokens
        ids, full_mask = self._left_pad(seqs, extra=steps)
        width = ids.shape[1]
        stop = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        buf = torch.full((n, steps), self.pad_id, dtype=torch.long, device=self.device)
        length = torch.full((n,), steps, dtype=torch.long)  # tokens kept per row
        stopped = torch.zeros(n, dtype=torch.bool)
        alive = torch.arange(n, device=self.device)  # batch row -> original row
        mask = full_mask[:, :width]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        cache, pos = getattr(out, self.cache_kw), pos[:, -1:]
        for step in range(steps):
            nxt = self._pick(out.logits[:, -1], params, gen)
            buf[alive, step] = nxt
            if len(stop):
                finished = torch.isin(nxt, stop)
                if bool(finished.any()):  # the only per-step sync, and only with stop tokens
                    rows = alive[finished].cpu()
                    length[rows], stopped[rows] = step + 1, True
                    keep = (~finished).nonzero().squeeze(-1)
                    if len(keep) == 0:
                        break
                    # prune finished rows from the cache and the batch
                    alive, nxt, pos = alive[keep], nxt[keep], pos[keep]
                    full_mask = full_mask[keep]
                    cache.batch_select_indices(keep)
            if step == steps - 1:
                break
            pos = pos + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=full_mask[:, : width + step + 1],
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: cache},
            )
        tokens, kept, stops = buf.cpu().tolist(), length.tolist(), stopped.tolist()
        return [(tokens[r][: kept[r]], "stop" if stops[r] else "length") for r in range(n)]

    def _decode_no_cache(
        self,
        model: torch.nn.Module,
        seqs: list[Sequence[int]],
        params: GenerationParams,
        gen: torch.Generator,
    ) -> list[tuple[list[int], str]]:
        """Reference path for tests: every step recomputes the whole prefix, no cache."""
        ids, mask = self._left_pad(seqs)
        stop = set(params.stop_token_ids)
        tokens: list[list[int]] = [[] for _ in seqs]
        reasons = ["length"] * len(seqs)
        alive = list(range(len(seqs)))
        for _ in range(params.max_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            nxt = self._pick(logits[:, -1], params, gen)
            keep = []
            for j, (row, tok) in enumerate(zip(alive, nxt.tolist(), strict=True)):
                tokens[row].append(tok)
                if tok in stop:
                    reasons[row] = "stop"
                else:
                    keep.append(j)
            if not keep:
                break
            sel = torch.tensor(keep, device=self.device)
            alive = [alive[j] for j in keep]
            ids = torch.cat([ids[sel], nxt[sel, None]], dim=1)
            mask = torch.cat([mask[sel], mask.new_ones((len(keep), 1))], dim=1)
        return list(zip(tokens, reasons, strict=True))

    # -- scoring --------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]],
        top_k: int,
        progress: Progress | None = None,
    ) -> list[TokenScores]:
        """Top-k logprobs at every target position (position P+j-1 predicts target j).

        Left-pad prompt+target so every target ends at the last position and keep
        only the logits that predict target tokens (``logits_to_keep``), so a
        batch's logits are rows x (longest target + 1) x V, never rows x L x V.
        Log-softmax is over the tokenizer's vocabulary (padding rows sliced off).
        """
        if len(prompt_ids) != len(target_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
        self._check_prompts(prompt_ids)
        model = self._live_model()
        seqs = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids, strict=True)]
        out: list[TokenScores | None] = [None] * len(seqs)
        k = max(0, min(top_k, self.vocab_limit))
        done = 0
        for batch in self._batches([len(s) for s in seqs], 0):
            ids, mask = self._left_pad([seqs[i] for i in batch])
            tmax = max(len(target_ids[i]) for i in batch)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with naming_memory(f"scoring {len(batch)} sequences", self.device, BATCH_HINT):
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=tmax + 1
                ).logits[:, :-1, : self.vocab_limit]  # kept position r predicts token W - tmax + r
            for row, i in enumerate(batch):
                t = len(target_ids[i])
                lp = torch.log_softmax(logits[row, tmax - t :].float(), dim=-1)
                vals, idx = lp.topk(k, dim=-1)
                tgt = torch.as_tensor(list(target_ids[i]), dtype=torch.long, device=lp.device)
                out[i] = TokenScores(
                    idx.to(torch.int32).cpu().numpy(),
                    vals.cpu().numpy().astype(np.float32),
                    lp.gather(-1, tgt[:, None]).squeeze(-1).cpu().numpy().astype(np.float32),
                )
            done += len(batch)
            if progress is not None:
                progress(done, len(seqs))
        return [s for s in out if s is not None]

    def close(self) -> None:
        """Drop the engine's model; a call in flight keeps its own reference to the end."""
        self.model = None  # type: ignore[assignment]


def load_hf_engine(path: Path | str, *, dtype: str = "float32", device: str = "auto", **kw):
    """An :class:`HFEngine` over a model directory (see :mod:`train.models`)."""
    model = load_model(path, dtype=dtype, device=device)
    return HFEngine(model, load_tokenizer(path), **kw)
