"""Data-parallel training on 2 CPU processes (gloo): DDP and FSDP2 against one process, kill and resume, the API.

A run with 2 ranks of batch b must log the losses of one process with batch 2b and end with its adapter, also when
ranks hold different numbers of loss tokens (the data has answers of very different lengths). One test launches the
real command line through torchrun; the others fork the ranks from the test process (wired up as torchrun would),
which saves each rank the seconds of importing torch and transformers again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import lorakit
from lorakit.training import distributed
from lorakit.cli import main
from lorakit.models import load_model
from lorakit.training import Trainer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and "fork" in mp.get_all_start_methods()),
    reason="needs torch.distributed with the gloo backend and fork()",
)

WORLD = 2
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_script.py"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """The single-process reference runs use one thread, like each rank; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- data and runs ------------------------------------------------------------------------------------------------


def _write_data(directory: Path) -> tuple[Path, Path]:
    """Prompt/completion records whose completions range from 1 to 40 numbers: unequal token counts per rank."""
    rng = random.Random(0)
    rows = [{"prompt": f"Q{i} {'x' * rng.randint(0, 30)}: ",
             "completion": " ".join(str(rng.randint(0, 99)) for _ in range(rng.choice([1, 2, 3, 8, 20, 40])))}
            for i in range(48)]
    train, evaluation = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluation.write_text("".join(json.dumps({"prompt": f"P{i}: ", "completion": "ok"}) + "\n" for i in range(2)))
    return train, evaluation


def _args(data: tuple[Path, Path], out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-llama", "--data", str(data[0]), "--eval-data", str(data[1]),
            "--eval-samples", "2", "--seq-len", "64", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
            "--threads", "1", "--batch-size", str(batch_size), "--dtype", "float32", "--output-dir", str(out), *extra]


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_run(run: Path, reference: Path) -> None:
    """Losses within 1e-5 relative at every step, adapters within float tolerance."""
    losses, expected = _losses(run), _losses(reference)
    assert len(losses) == len(expected)
    for step, (loss, want) in enumerate(zip(losses, expected), start=1):
        assert abs(loss - want) <= 1e-5 * abs(want), (step, loss, want)
    adapter, want_adapter = _adapter(run), _adapter(reference)
    assert adapter.keys() == want_adapter.keys()
    for key in want_adapter:
        torch.testing.assert_close(adapter[key], want_adapter[key], rtol=1e-4, atol=1e-5, msg=key)


# -- launching ranks ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, target: Callable[..., object], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A forked child cannot use the OpenMP worker threads of a parent that ran parallel torch ops (they do not exist
    # in the child, and its first parallel region would wait for them forever): one thread per rank, as torchrun's.
    torch.set_num_threads(1)
    try:
        target(*args)
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # skip the test process's exit handlers, inherited by the fork


def _fork_ranks(target: Callable[..., object], *args: object, timeout: float = 90) -> list[int | None]:
    """Run target(*args) on WORLD forked ranks (torchrun's environment, gloo); their exit codes."""
    port = _free_port()
    fork = mp.get_context("fork")
    ranks = [fork.Process(target=_rank_main, args=(rank, port, target, args)) for rank in range(WORLD)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in ranks]


def _cli_runs(*argvs: list[str]) -> None:
    for argv in argvs:
        assert main(argv) == 0


# -- the tests ----------------------------------------------------------------------------------------------------


def test_torchrun_ddp_matches_one_process_with_the_global_batch(tmp_path: Path) -> None:
    data = _write_data(tmp_path)
    assert main(_args(data, tmp_path / "single", 4, "--max-steps", "6")) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "lorakit", *_args(data, tmp_path / "ddp", 2, "--max-steps", "6")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=150, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp_path / "ddp", tmp_path / "single")
    assert "trainable params" in done.stdout  # rank 0 reports; a checkpoint and the plot are written once
    assert (tmp_path / "ddp" / "checkpoint" / "state.json").is_file() and (tmp_path / "ddp" / "loss.png").is_file()


def test_fsdp_lora_dora_vera_and_qlora_match_one_process(tmp_path: Path) -> None:
    data = _write_data(tmp_path)
    methods = {"lora": ["--r", "4"], "vera": ["--method", "vera", "--r", "16", "--lr", "2e-2"],
               "dora": ["--method", "dora", "--r", "4", "--grad-accum", "2"],  # token-weighted over micro-batches too
               "qlora": ["--quantize", "nf4", "--r", "4"]}  # NF4's packed weights stay whole on every rank
    for name, options in methods.items():
        assert main(_args(data, tmp_path / f"single-{name}", 4, "--max-steps", "4", *options)) == 0
    argvs = [_args(data, tmp_path / f"fsdp-{name}", 2, "--max-steps", "4", "--fsdp", *options)
             for name, options in methods.items()]
    assert _fork_ranks(_cli_runs, *argvs) == [0] * WORLD
    for name in methods:
        _assert_same_run(tmp_path / f"fsdp-{name}", tmp_path / f"single-{name}")


def _killed_at(step: int, argv: list[str]) -> None:
    """Run `argv`; rank 1 dies by SIGKILL when `step` steps are done."""
    original = Trainer._optimizer_step

    def dying(self: Trainer) -> tuple[float, int]:
        if self.step == step and self.dist.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    Trainer._optimizer_step = dying
    main(argv)


def test_killed_ddp_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    data = _write_data(tmp_path)
    options = ("--max-steps", "8", "--save-every", "3", "--dropout", "0.1", "--seed", "3")
    straight, killed = _args(data, tmp_path / "straight", 2, *options), _args(data, tmp_path / "killed", 2, *options)
    assert _fork_ranks(_cli_runs, straight) == [0] * WORLD
    codes = _fork_ranks(_killed_at, 4, killed)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert _fork_ranks(_cli_runs, [*killed, "--resume"]) == [0] * WORLD

    reference, resumed = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))


def _ddp_reduces_adapters_only() -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    context = distributed.context()
    model, _ = load_model("tiny-llama")
    torch.manual_seed(0)
    lorakit.adapt(model, lorakit.VeraConfig(r=8, target_modules="all-linear"))  # shared, non-persistent buffers
    wrapped = context.wrap(model)
    reduced: list[int] = []

    def counting_hook(group, bucket):  # no annotations: DDP rejects the string ones of `from __future__`
        reduced.append(bucket.buffer().numel())
        return allreduce_hook(group, bucket)

    wrapped.register_comm_hook(None, counting_hook)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(context.rank))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    assert sum(reduced) == lorakit.trainable_parameters(model).trainable  # no frozen weight is all-reduced
    assert not wrapped.will_sync_module_buffers()  # VeRA's projections are not broadcast

    other, _ = load_model("tiny-llama")
    torch.manual_seed(context.rank)  # a different adapter init on each rank is caught before training
    lorakit.adapt(other, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj\.adapters\.default\.delta\.lora_A"):
        context.wrap(other)


def _example(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("ddp_script", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--output-dir", str(out), "--steps", "3"])


def test_ddp_reduces_only_adapter_gradients_and_checks_replicas() -> None:
    load_model("tiny-llama")  # build the cache once, before the ranks fork
    assert _fork_ranks(_ddp_reduces_adapters_only) == [0] * WORLD


def test_python_api_example_trains_under_ddp(tmp_path: Path) -> None:
    assert _fork_ranks(_example, tmp_path / "adapter") == [0] * WORLD
    config = lorakit.read_adapter_config(tmp_path / "adapter")
    assert config.r == 8 and len(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) > 0
