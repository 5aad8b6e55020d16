"""The process group of a launched training run, and the model wrapped for it (DDP or FSDP2).

    dist = Dist.from_env(strategy="fsdp", mixed_precision=False)   # torchrun's RANK, WORLD_SIZE
    module = dist.wrap(HiddenStates(lm))        # DDP, or fully_shard on each decoder layer + root
    ...
    full = dist.full_state_dict(module)         # rank 0: every weight, whole; the others: {}

One process (no torchrun) is `Dist()`: world 1, nothing wrapped, no collective.

Why the lm_head weight may be read outside the module's forward under FSDP2: the loss
multiplies the decoder's hidden states by it chunk by chunk (train.fused), after `forward`
returned. The root module's parameters (embeddings, final norm, lm_head) are gathered for its
forward and, with `reshard_after_forward=False` on the root, stay gathered until the backward
pass has reduced their gradients: the module attribute is then the whole (unsharded)
parameter, and the gradient the loss makes for it is reduce-scattered like any other. The
decoder layers are their own FSDP groups (gathered one at a time: the memory FSDP saves).

The gradient of every process is the sum over the global batch (train.trainer multiplies its
loss by the world size); DDP and FSDP average over processes, so the two cancel and the step
is the one a single process makes.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from data.errors import UserError

Strategy = Literal["ddp", "fsdp"]


class TooFewDevicesError(UserError):
    """More processes on a host than GPUs it shows: one GPU a process (one line)."""


TIMEOUT = timedelta(minutes=30)  # a collective waiting on a dead peer fails after this


class Dist:
    """The collectives the training loop needs, for one process or a torchrun group."""

    def __init__(
        self,
        strategy: Strategy = "ddp",
        *,
        mixed_precision: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.strategy = strategy
        self.mixed_precision = mixed_precision
        self.device = device  # where a launched process trains; None: where the model is
        self.active = tdist.is_available() and tdist.is_initialized()
        self.world = tdist.get_world_size() if self.active else 1
        self.rank = tdist.get_rank() if self.active else 0

    @classmethod
    def from_env(cls, strategy: Strategy, *, cpu: bool = False, mixed_precision: bool = False):
        """Join the group torchrun describes in the environment: NCCL with one GPU a process
        (LOCAL_RANK), or gloo on CPUs (none visible, or `cpu`)."""
        gpu = torch.cuda.is_available() and not cpu
        device = torch.device("cpu")
        if gpu:
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= count:
                raise TooFewDevicesError(
                    f"process {local} of this host needs GPU {local}, but {count} are visible: "
                    "lower train.distributed.nproc, or make more GPUs visible"
                )
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        launched = "WORLD_SIZE" in os.environ  # else `python -m train.trainer` alone: no group
        if launched and not tdist.is_initialized():
            tdist.init_process_group("nccl" if gpu else "gloo", timeout=TIMEOUT)
        return cls(strategy, mixed_precision=mixed_precision, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.active and self.strategy == "fsdp"

    def wrap(self, module: nn.Module, layers: list[nn.Module]) -> nn.Module:
        """The module as this strategy trains it; `layers`: the decoder layers (FSDP units)."""
        device = self.device or next(module.parameters()).device
        if self.sharded:  # moves each unit to `device` as it shards it: one layer whole at most
            return _fully_shard(module, layers, self.mixed_precision, device)
        module.to(device)
        if not self.active:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, module: nn.Module, *, sync: bool):
        """Skip the gradient reduction on all but the last micro-batch of a step."""
        if sync or not self.active:
            return nullcontext()
        if self.sharded:
            return _fsdp_sync(module, False)
        return module.no_sync()

    def sum(self, value: Tensor) -> Tensor:
        if self.active:
            tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        return value

    def clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """The global gradient norm (sharded gradients: over every shard), clipped to max_norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def full_state_dict(self, module: nn.Module) -> dict[str, Tensor]:
        """Every parameter and buffer of `module`, whole, on rank 0's CPU ({} on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)

    def close(self) -> None:
        if self.active:
            tdist.destroy_process_group()


def _fully_shard(
    module: nn.Module, layers: list[nn.Module], mixed: bool, device: torch.device
) -> nn.Module:
    """FSDP2: each decoder layer a unit, then the root (kept gathered after its forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed
        else MixedPrecisionPolicy()
    )
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def _fsdp_sync(module: nn.Module, sync: bool):
    """FSDP2's switch for the gradient reduce-scatter, as a context manager."""

    @contextlib.contextmanager
    def switched():
        module.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return switched()
