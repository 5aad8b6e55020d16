"""The ``hf`` engine: transformers models in-process, batched, with the KV cache.

Why a hand-written decode loop instead of ``model.generate``: the loop is ~40
lines, gives exact control over finish reasons and stop tokens, prunes rows
that have finished from the KV cache (student traces vary 3x in length, so a
batch otherwise decodes padding for most of its life), and draws all randomness
from one ``torch.Generator`` seeded per call, so a resumed shard regenerates
exactly what the killed one would have.

Batches are formed from length-sorted rows and sized so batch x length stays
under ``max_batch_tokens``: memory is bounded by config, not by the data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engines.base import Completion, GenerationParams, Progress, TokenScores

log = logging.getLogger("mpd.engines.hf")


class HFEngine:
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
        self.vocab_limit = len(tokenizer)  # model rows past this are padding, never sampled
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.use_cache = use_cache
        self.device = next(model.parameters()).device

    # -- batching -------------------------------------------------------------
    def _batches(self, lengths: Sequence[int], budget: int) -> list[list[int]]:
        """Row indices grouped longest-first so each batch's padding is small."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, current = [], []
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

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation -----------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        lengths = [len(prompts[p]) for p, _ in rows]
        gen = torch.Generator(device="cpu").manual_seed(params.seed)
        out: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        done, started = 0, time.monotonic()
        for batch in self._batches(lengths, params.max_tokens):
            seqs = [prompts[rows[i][0]] for i in batch]
            for i, (ids, reason) in zip(batch, self._decode(seqs, params, gen), strict=True):
                p, s = rows[i]
                out[p][s] = Completion(p, s, ids, self._text(ids, params), reason)
            done += len(batch)
            if progress is not None:
                progress(done, len(rows))
            log.debug("generated %d/%d rows in %.1fs", done, len(rows), time.monotonic() - started)
        return [[c for c in row if c is not None] for row in out]

    def _text(self, ids: list[int], params: GenerationParams) -> str:
        body = ids[:-1] if ids and ids[-1] in params.stop_token_ids else ids
        return self.tokenizer.decode(body, skip_special_tokens=False)

    def _pick(self, logits: torch.Tensor, params: GenerationParams, gen: torch.Generator):
        logits = logits[:, : self.vocab_limit].float()
        if params.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the token crossing p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)

    @torch.inference_mode()
    def _decode(
        self, seqs: list[Sequence[int]], params: GenerationParams, gen: torch.Generator
    ) -> list[tuple[list[int], str]]:
        """Decode one batch; returns (token ids, finish reason) per row."""
        ids, mask = self._left_pad(seqs)
        stop = torch.tensor(list(params.stop_token_ids) or [-1], device=self.device)
        tokens: list[list[int]] = [[] for _ in seqs]
        reasons = ["length"] * len(seqs)
        alive = torch.arange(len(seqs), device=self.device)  # batch row -> original row
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        full = ids
        for step in range(params.max_tokens):
            nxt = self._pick(logits, params, gen)
            finished = torch.isin(nxt, stop)
            for row, tok in zip(alive.tolist(), nxt.tolist(), strict=True):
                tokens[row].append(tok)
            for row in alive[finished].tolist():
                reasons[row] = "stop"
            if step == params.max_tokens - 1 or bool(finished.all()):
                break
            keep = (~finished).nonzero().squeeze(-1)
            if len(keep) < len(alive):  # prune finished rows from the cache and the batch
                alive, nxt, mask, pos = alive[keep], nxt[keep], mask[keep], pos[keep]
                full = full[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            pos = pos[:, -1:] + 1
            if self.use_cache:
                out = self.model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                )
            else:  # reference path for tests: recompute everything from scratch each step
                full = torch.cat([full, nxt[:, None]], dim=1)
                all_pos = (mask.cumsum(-1) - 1).clamp(min=0)
                out = self.model(input_ids=full, attention_mask=mask, position_ids=all_pos)
            logits = out.logits[:, -1]
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
        """Left-pad prompt+target so every target ends at the last position; keep only
        the logits that predict target tokens (``logits_to_keep``), never B x L x V."""
        seqs = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids, strict=True)]
        out: list[TokenScores | None] = [None] * len(seqs)
        k = min(top_k, self.vocab_limit)
        done = 0
        for batch in self._batches([len(s) for s in seqs], 0):
            ids, mask = self._left_pad([seqs[i] for i in batch])
            tmax = max(len(target_ids[i]) for i in batch)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=tmax + 1
            ).logits[:, :-1, : self.vocab_limit]  # position j predicts token j + 1
            for row, i in enumerate(batch):
                t = len(target_ids[i])
                lp = torch.log_softmax(logits[row, tmax - t :].float(), dim=-1)
                vals, idx = lp.topk(k, dim=-1)
                tgt = torch.tensor(list(target_ids[i]), dtype=torch.long, device=lp.device)
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
        self.model = None  # type: ignore[assignment]


def load_hf_engine(path: Path | str, *, dtype: str = "float32", device: str = "auto", **kw):
    """An :class:`HFEngine` over a model directory (see :mod:`train.models`)."""
    from train.models import load_model, load_tokenizer

    model = load_model(path, dtype=dtype, device=device)
    return HFEngine(model, load_tokenizer(path), **kw)
