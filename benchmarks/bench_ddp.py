"""Training throughput (tokens/s) of one process against two data-parallel processes (gloo) on the same CPU cores.

Cases, each a fresh process (or torchrun group) running lorakit's own Trainer step on the same global batch:
- `1p x 2t`: one process, 2 torch threads, batch 2b;
- `1p x 1t`: one process, 1 thread, batch 2b (what one core does alone);
- `2p x 1t ddp`: two processes under torchrun, 1 thread each, batch b each, DistributedDataParallel;
- `2p x 1t fsdp`: the same with the base sharded by FSDP2 (`--fsdp`).
Examples are packed into full blocks of --seq-len tokens, so every step trains on the same number of tokens. Cases
are interleaved over --rounds and the best round of each is reported (the machine may be shared).

Usage: python benchmarks/bench_ddp.py [--quick] [--model smollm2-135m] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name: (processes, threads per process, extra train options)
    "1p x 2t": (1, 2, []),
    "1p x 1t": (1, 1, []),
    "2p x 1t ddp": (2, 1, []),
    "2p x 1t fsdp": (2, 1, ["--fsdp"]),
}


def worker(args: argparse.Namespace, extra: list[str]) -> None:
    """Time `--steps` optimizer steps after `--warmup` ones; rank 0 prints one JSON line."""
    from lorakit.train import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model=args.model, method="lora", r=16, alpha=32, targets="all-linear",
                             batch_size=args.batch_size, seq_len=args.seq_len, pack=True, threads=args.threads,
                             fsdp="--fsdp" in extra, builtin_train_size=args.train_size, output_dir=out)
        trainer = Trainer(config, echo=lambda _: None)
        trainer.wrapped.train()
        for _ in range(args.warmup):
            trainer._optimizer_step()
        trainer.dist.barrier()
        start, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += trainer._optimizer_step()[1]
        elapsed = time.perf_counter() - start
    if trainer.dist.is_main:
        print(json.dumps({"tokens_per_s": tokens / elapsed, "step_s": elapsed / args.steps}))


def run_case(name: str, args: argparse.Namespace) -> dict[str, float]:
    processes, threads, extra = CASES[name]
    per_process = args.global_batch // processes
    options = ["--worker", "--model", args.model, "--batch-size", str(per_process), "--seq-len", str(args.seq_len),
               "--threads", str(threads), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--train-size", str(args.train_size), *extra]
    script = str(Path(__file__).resolve())
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*launcher, script, *options], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step over all processes")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=1000, help="built-in task examples (packed into blocks)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 3 steps, 1 round: a smoke test")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.worker:
        worker(args, extra)
        return
    if args.quick:
        args.model, args.steps, args.rounds = "tiny-llama", 3, 1
    names = args.cases.split(",")
    load_before = os.getloadavg()[0]
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name in names:
            result = run_case(name, args)
            print(f"{name}: {result['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
            if name not in best or result["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = result
    reference = best[names[0]]["tokens_per_s"]
    print(f"{args.model}, LoRA r=16 all-linear, global batch {args.global_batch} x {args.seq_len} tokens, "
          f"best of {args.rounds} round(s) of {args.steps} steps; {os.cpu_count()} CPUs, 1-minute load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| case | tokens/s | s/step | vs " + names[0] + " |\n|---|---|---|---|")
    for name in names:
        result = best[name]
        print(f"| {name} | {result['tokens_per_s']:,.0f} | {result['step_s']:.2f} | "
              f"{result['tokens_per_s'] / reference:.2f}x |")


if __name__ == "__main__":
    main()
