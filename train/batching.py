"""Training examples, the order the trainer visits them in, and their collation into tensors.

A training example (one kept rewrite with the teacher's stored top-k for its target tokens)::

    Example(prompt_ids=[1, 88, 412, ...],          # chat-formatted problem, ends "assistant\\n"
            target_ids=[5, 17, 230, ..., 2],       # the completion INCLUDING its final EOS
            topk_ids=array([[17, 3, ...], ...]),   # [len(target), k] int, offline teacher only
            topk_logprobs=array([[-0.02, -4.1, ...], ...]))  # [len(target), k] nats (dequantised;
                                                   # +inf: a candidate the scores did not keep)

Token t of the concatenated sequence is predicted by position t − 1, so target token j is
predicted by position len(prompt) + j − 1; row j of the top-k arrays describes that position.

Order: the global batch of optimizer step i is a pure function of (seed, i, the examples'
lengths, the global batch size). Resuming therefore needs only the step number, and any number
of data-parallel processes visits the same batches (each takes its `share` of each micro-batch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.schemas import decode_topk
from train.losses import target_mask

# Global batches per length-sorting pool: enough that batches hold similar lengths (little
# padding), few enough that the order within an epoch stays well mixed.
POOL_BATCHES = 50


@dataclass(frozen=True, eq=False)
class Example:
    """One sequence to train on; see the module docstring for the layout.

    `teacher_prompt_ids` is the online teacher's own context for the same target (self-distillation:
    the problem plus "be concise"); None means the teacher reads `prompt_ids`, like the student.
    """

    prompt_ids: list[int]
    target_ids: list[int]
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    teacher_prompt_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.target_ids:
            raise ValueError("an example needs at least one prompt and one target token")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs come together")
        if self.topk_ids is not None and self.topk_logprobs is not None:
            want = (len(self.target_ids), self.topk_ids.shape[-1])
            if self.topk_ids.shape != want or self.topk_logprobs.shape != want:
                raise ValueError(f"top-k arrays must be [len(target), k] = {want}")

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def example_from_scores(
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    topk_ids: Sequence[int],
    topk_logprob_gaps: Sequence[int],
    k: int,
    topk_counts: Sequence[int] | None = None,
) -> Example:
    """An offline-teacher example from one `scores` row (flat arrays, positions one after
    another; the logprobs as the table stores them, rank-order gaps; `topk_counts` when the
    positions keep fewer than k: see data.schemas.decode_topk)."""
    n = len(target_ids)
    if (len(topk_counts) if topk_counts is not None else len(topk_ids) // k) != n:
        raise ValueError(f"scores hold {len(topk_ids)} entries, expected {n} targets × k={k}")
    ids, logprobs = decode_topk(topk_ids, topk_logprob_gaps, k, topk_counts)
    return Example(list(prompt_ids), list(target_ids), ids, logprobs)


def fit_examples(examples: Sequence[Example], max_length: int) -> tuple[list[Example], int, int]:
    """Cut targets so prompt + target ≤ max_length; returns (kept, dropped, truncated).

    A cut target loses its EOS, which is right: the trace did not end there. An example whose
    prompt (the student's or the teacher's) leaves no room for one target token is dropped.
    """
    kept, dropped, truncated = [], 0, 0
    for ex in examples:
        room = max_length - max(len(ex.prompt_ids), len(ex.teacher_prompt_ids or ()))
        if room < 1:
            dropped += 1
            continue
        if room < len(ex.target_ids):
            truncated += 1
            cut = None if ex.topk_ids is None else slice(0, room)
            ex = replace(
                ex,
                target_ids=ex.target_ids[:room],
                topk_ids=None if cut is None else ex.topk_ids[cut],
                topk_logprobs=None if cut is None else ex.topk_logprobs[cut],
            )
        kept.append(ex)
    return kept, dropped, truncated


class BatchPlan:
    """The example indices of every optimizer step's global batch, deterministic in (seed, step).

    Each epoch draws a permutation (from `seed` and the epoch number), keeps n // G global batches
    of G indices (the remainder waits for a later epoch; with n < G an epoch cycles permutations
    to fill one batch), sorts each pool of POOL_BATCHES batches by length, cuts it into batches
    and shuffles their order. Every batch is sorted by length, so its micro-batches pad little.
    """

    def __init__(self, lengths: Sequence[int], global_size: int, seed: int) -> None:
        if len(lengths) == 0:  # a list, or an examples file's lengths array
            raise ValueError("no examples to train on")
        self.lengths = np.asarray(lengths)
        self.size = global_size
        self.seed = seed
        self.per_epoch = max(1, len(lengths) // global_size)
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def batch(self, step_index: int) -> list[int]:
        """Global batch of the 0-based optimizer step `step_index`."""
        epoch, b = divmod(step_index, self.per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return self._batches[b]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        if n >= self.size:
            order = rng.permutation(n)[: self.per_epoch * self.size]
        else:
            order = np.concatenate([rng.permutation(n) for _ in range(-(-self.size // n))])
            order = order[: self.size]
        batches: list[list[int]] = []
        pool = POOL_BATCHES * self.size
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            group = [chunk[i : i + self.size].tolist() for i in range(0, len(chunk), self.size)]
            batches += [group[i] for i in rng.permutation(len(group))]
        return batches


def micro_batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """The micro-batches of one global batch, in accumulation order: indices[m·b : (m+1)·b]."""
    count = len(indices) // batch_size
    return [list(indices[m * batch_size : (m + 1) * batch_size]) for m in range(count)]


def share(indices: Sequence[int], world: int, rank: int) -> list[int]:
    """Process `rank`'s contiguous slice of a micro-batch (sizes differ by one at most).

    Every process takes part in every micro-batch: the global batch, and so each step, is the
    same for any process count (a process with nothing to do would hang the others' collective,
    hence batch_size ≥ processes)."""
    n = len(indices)
    return list(indices[rank * n // world : (rank + 1) * n // world])


@dataclass
class Batch:
    """One micro-batch. Position-aligned fields are [B, T − 1]: position t predicts token t + 1."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, T-1]
    loss_mask: Tensor  # [B, T-1], from lengths: the EOS is in it even when pad == eos
    topk_ids: Tensor | None = None  # [B, T-1, k]
    topk_logprobs: Tensor | None = None  # [B, T-1, k]
    teacher_input_ids: Tensor | None = None  # [B, T_t]
    teacher_attention_mask: Tensor | None = None
    teacher_loss_mask: Tensor | None = None  # [B, T_t-1]

    def to(self, device: torch.device) -> Batch:
        moved = {k: None if v is None else v.to(device) for k, v in vars(self).items()}
        return Batch(**moved)


def _pad(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_id: int):
    """(ids [B, T], attention [B, T], loss mask [B, T-1]) for rows [prompt][target][pad]."""
    rows = [list(p) + list(t) for p, t in zip(prompts, targets, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
    mask = target_mask([len(p) for p in prompts], [len(t) for t in targets], width)
    return ids, attention, mask[:, 1:]


def _topk(examples: Sequence[Example], width: int) -> tuple[Tensor, Tensor]:
    """Top-k rows placed at the positions predicting each target token, [B, width, k]."""
    k = examples[0].topk_ids.shape[-1]
    ids = np.zeros((len(examples), width, k), dtype=np.int64)
    logprobs = np.zeros((len(examples), width, k), dtype=np.float32)
    for b, ex in enumerate(examples):
        start = len(ex.prompt_ids) - 1
        ids[b, start : start + len(ex.target_ids)] = ex.topk_ids
        logprobs[b, start : start + len(ex.target_ids)] = ex.topk_logprobs
    return torch.from_numpy(ids), torch.from_numpy(logprobs)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded tensors; masks from lengths, so `pad_id` may equal the EOS id."""
    targets = [ex.target_ids for ex in examples]
    ids, attention, mask = _pad([ex.prompt_ids for ex in examples], targets, pad_id)
    batch = Batch(ids, attention, ids[:, 1:], mask)
    if examples[0].topk_ids is not None:
        batch.topk_ids, batch.topk_logprobs = _topk(examples, ids.shape[1] - 1)
    if any(ex.teacher_prompt_ids is not None for ex in examples):
        prompts = [ex.teacher_prompt_ids or ex.prompt_ids for ex in examples]
        t_ids, t_attention, t_mask = _pad(prompts, targets, pad_id)
        batch.teacher_input_ids, batch.teacher_attention_mask = t_ids, t_attention
        batch.teacher_loss_mask = t_mask
    return batch


def save_examples(path: Path, examples: Sequence[Example]) -> None:
    """JSON lines, one example a line: how a launched (multi-process) run receives its data."""
    with open(path, "w") as fh:
        for ex in examples:
            record = {
                "prompt_ids": ex.prompt_ids,
                "target_ids": ex.target_ids,
                "topk_ids": None if ex.topk_ids is None else ex.topk_ids.tolist(),
                "topk_logprobs": None if ex.topk_logprobs is None else ex.topk_logprobs.tolist(),
                "teacher_prompt_ids": ex.teacher_prompt_ids,
            }
            fh.write(json.dumps(record) + "\n")


def load_examples(path: Path) -> list[Example]:
    """Inverse of `save_examples`."""
    out = []
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        ids = None if r["topk_ids"] is None else np.asarray(r["topk_ids"], dtype=np.int64)
        lps = None if r["topk_logprobs"] is None else np.asarray(r["topk_logprobs"], np.float32)
        out.append(Example(r["prompt_ids"], r["target_ids"], ids, lps, r["teacher_prompt_ids"]))
    return out
