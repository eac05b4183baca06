"""lorakit's Python API inside your own DistributedDataParallel script: adapt, wrap in DDP, train, save on rank 0.

    torchrun --nproc_per_node=2 examples/ddp_script.py --output-dir ddp-adapter        # CPU (gloo) or GPUs (nccl)

What matters for adapters under DDP:
- every rank builds the same base and the same adapter init: seed identically before `lorakit.adapt`;
- frozen base weights have no gradients, so DDP all-reduces the adapter gradients only;
- with VeRA or an NF4 base, pass `forward_sync_buffers=False` (`broadcast_buffers=False` on older torch): their
  buffers (shared projections, packed weights) are equal on every rank already, and DDP would otherwise copy them
  from rank 0 at every forward;
- save from rank 0, from the inner model (`ddp.module` or the model you wrapped), so keys carry no "module." prefix.
Each rank here sees batches with equal token counts, so Hugging Face's per-rank mean loss is the global mean; with
padding or masked prompts, sum the token losses and divide by the global count (what `lorakit train` does).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="ddp-adapter")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # RANK, WORLD_SIZE, MASTER_ADDR... come from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same base weights and adapter init on every rank
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).to(device)
    lorakit.adapt(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    data = torch.randint(0, 256, (8 * world_size, 32), generator=torch.Generator().manual_seed(1))
    shard = data[rank::world_size].to(device)  # this rank's examples of every global batch
    for step in range(args.steps):
        loss = ddp(input_ids=shard, labels=shard).loss
        loss.backward()  # DDP averages the adapter gradients over ranks here
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:2d}  loss on rank 0 {loss.item():.3f}")

    if rank == 0:
        lorakit.save_adapter(model, args.output_dir)  # the unwrapped model: PEFT's keys
        print(f"adapter saved to {args.output_dir}")
    dist.barrier()  # the other ranks wait until the files exist
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
