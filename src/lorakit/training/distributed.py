"""Running on PyTorch's own distributed engine: one process per device under `torchrun`.

`context()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), starts the process group (gloo on CPU,
nccl on CUDA) and tells the trainer who it is. With one process every method here is a no-op or the identity, so the
same training code runs alone or data-parallel. Rank r trains on slice r of every global batch (`data.BatchStream`);
rank 0 alone writes files.

Two ways to spread the model (`DistContext.wrap`):

- **DistributedDataParallel** (default): every rank holds the whole model. DDP's reducer holds only parameters that
  require gradients, i.e. the adapters: frozen base weights are never all-reduced. Buffers are not broadcast
  (`forward_sync_buffers=False`): those lorakit adds (VeRA's shared projections, DoRA's cached row norms, NF4's packed
  weights) follow from the seed or the base weights, so they are equal on every rank already, and broadcasting them
  at each forward would copy the quantized base every step. DDP's start-up broadcast of every parameter (the whole
  base) is skipped (torch 2.6+) for `check_replicated`, which compares exact integer fingerprints of all parameters
  across ranks and stops the run with the name of the first one that differs (another base, another adapter init).
- **FSDP2** (`fsdp=True`): `fully_shard` on every decoder layer (the model's `_no_split_modules`) and on the root
  shards the frozen base, so a rank keeps 1/world_size of it between uses and gathers one layer at a time. The
  adapters are FSDP's `ignored_params`: whole on every rank, their gradients all-reduced here in one flat buffer
  after backward. They are a small fraction of the model, so sharding them would save little, and whole adapters
  keep saving, checkpoints (rank 0 holds every tensor), LoRA+, clipping, DoRA and VeRA as they are in one process.
  Because every forward gathers weights, every rank evaluates (transformers' `generate` keeps ranks in step).
  NF4 bases work too, but their packed weights are buffers, which FSDP does not shard: only the dense rest
  (embeddings, norms, output head) is sharded.

Loss normalization: Hugging Face's causal-LM loss is a per-token mean over one micro-batch, and averaging such means
over ranks (what a gradient all-reduce does) gives a token on a rank with few loss tokens more weight than one on a
rank with many. lorakit sums the token losses of each micro-batch (loss.py: logits only where a label is) and
divides by the number of loss tokens in the whole optimizer step over all ranks (one all-reduce per step); since the
gradient reduction averages over ranks, the loss is multiplied by world_size before backward (`scale_loss`). Loss and
gradients are then those of one process that sees the whole global batch at once.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SHARDED_FLAG = "_is_fsdp_managed_module"  # transformers' mark of FSDP2 models: generate then keeps ranks in step


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # -- the model -------------------------------------------------------------------------------------------------

    def load_device(self, fsdp: bool) -> torch.device:
        """Where to load the base model: the CPU when FSDP will move it to the device shard by shard."""
        return torch.device("cpu") if fsdp and self.active else self.device

    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """The model alone; under torchrun, DDP around it or (`fsdp`) the model itself, sharded in place."""
        if not self.active:
            return model
        check_replicated(model, self._reduce_device())
        if fsdp:
            return shard(model, self.device, self.world_size)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **_ddp_options())

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Local rank 0 runs the block first (e.g. building the model cache), the other ranks of its node after it."""
        if self.active and self.local_rank != 0:
            dist.barrier()
        yield
        if self.active and self.local_rank == 0:
            dist.barrier()

    # -- one optimizer step ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if isinstance(wrapped, DistributedDataParallel) and not last:
            with wrapped.no_sync():
                yield
        else:
            yield

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call backward on: gradient reductions average over ranks, so multiply by world_size first."""
        return loss * self.world_size if self.active else loss

    def reduce_gradients(self, wrapped: nn.Module) -> None:
        """Average the whole (unsharded) adapter gradients over ranks under FSDP; DDP has done it in backward."""
        if not is_sharded(wrapped):
            return
        params = [p for p in wrapped.parameters() if p.requires_grad]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))

    # -- small collectives -----------------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(tensor)
        return tensor.item()

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64, device=self._reduce_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        tensor = torch.tensor([int(flag)], device=self._reduce_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def rng_states(self) -> list[Tensor]:
        """Every rank's torch CPU RNG state, in rank order (ranks draw their own dropout masks)."""
        state = torch.get_rng_state()
        if not self.active:
            return [state]
        device = self._reduce_device()
        gathered = [torch.empty_like(state, device=device) for _ in range(self.world_size)]
        dist.all_gather(gathered, state.to(device))
        return [s.cpu() for s in gathered]

    def _reduce_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def context() -> DistContext:
    """This process's place in the job (starting the process group under torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(rank, world_size, device, local_rank)


# ---------------------------------------------------------------------------------------------------------------
# Replicas and shards


def fingerprint(tensor: Tensor) -> Tensor:
    """An exact, order-independent checksum: the tensor's bit patterns as integers, summed in int64 (wrapping)."""
    return tensor.detach().contiguous().view(_INT_OF_SIZE[tensor.element_size()]).sum(dtype=torch.int64)


def _ddp_options() -> dict[str, bool]:
    """No start-up broadcast of every parameter where DDP can skip it (torch 2.6+; `check_replicated` runs instead),
    no buffer broadcast at each forward (`forward_sync_buffers` in newer torch, `broadcast_buffers` before)."""
    accepted = inspect.signature(DistributedDataParallel).parameters
    options = {"init_sync": False} if "init_sync" in accepted else {}
    options["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = False
    return options


def check_replicated(model: nn.Module, device: torch.device) -> None:
    """Raise RuntimeError, on every rank, unless all ranks hold the same parameters bit for bit.

    Covers shapes, the frozen base and the seed-derived adapter init; a collective, so every rank must call it.
    """
    names = [name for name, _ in model.named_parameters()]
    counts = torch.tensor([len(names), -len(names)], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0] != -counts[1]:
        raise RuntimeError("ranks hold models with different numbers of parameters; load the same model everywhere")
    local = torch.stack([torch.stack((torch.tensor(p.numel(), device=p.device), fingerprint(p))).to(device)
                         for p in model.parameters()])  # [n, 2]
    reference = local.clone()
    dist.broadcast(reference, src=0)
    differs = (reference != local).any(1).nonzero()
    first = torch.tensor([int(differs[0]) if len(differs) else len(names)], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first) < len(names):
        raise RuntimeError(f"parameter {names[int(first)]} differs between ranks: every rank must load the same base "
                           "model and seed the adapter init identically (torch.manual_seed before lorakit.adapt)")


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2 in place: each decoder layer and the root sharded over all ranks, trainable parameters kept whole."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"--fsdp shards a model decoder layer by decoder layer, but {type(model).__name__} names "
                         "no layer class in _no_split_modules")
    trainable = {p for p in model.parameters() if p.requires_grad}
    for param in trainable:  # FSDP moves what it shards to the device, not what it ignores
        param.data = param.data.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    setattr(model, SHARDED_FLAG, True)
    return model


def _fully_shard() -> Callable[..., nn.Module]:
    """FSDP2's fully_shard; lorakit needs its ignored_params (torch 2.7 or newer)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise NotImplementedError(f"--fsdp needs torch 2.7 or newer (FSDP2 with ignored_params), not "
                                  f"{torch.__version__}")
    return fully_shard


def is_sharded(module: nn.Module) -> bool:
    """Whether `shard` has run on the module: its forward then needs every rank."""
    return getattr(module, SHARDED_FLAG, False)
