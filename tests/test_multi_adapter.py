"""Many adapters in one model: several active at once, deletion, weighted combination, mixed batches.

The oracle replaces every adapted layer by a float64 nn.Linear holding W + ΔW, with ΔW written out from the raw
factors and the scaling formula of the config (α/r or α/√r), never from lorakit's own merge code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from torch import Tensor, nn

import lorakit
from conftest import model_input, randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.adapters.combine import combine_adapters

# Layer paths of the tiny Llama (2 blocks).
Q0 = "model.layers.0.self_attn.q_proj"
UP1 = "model.layers.1.mlp.up_proj"


def expected_scaling(config: lorakit.LoraConfig, path: str) -> float:
    """α/r or α/√r for `path`, with the patterns' overrides (written out, not via config.scaling_for)."""
    leaf = path.rsplit(".", 1)[-1]
    r = config.rank_pattern.get(leaf, config.r)
    alpha = config.alpha_pattern.get(leaf, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def source_delta(model: nn.Module, name: str, path: str) -> Tensor:
    """s·B·A (LoRA) or diag(λ_b)·B_s·diag(λ_d)·A_s (VeRA) of adapter `name` at `path` in float64; zero if absent."""
    layer = model.get_submodule(path)
    if name not in layer.adapters:
        return torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    delta = layer.adapters[name].delta
    config = lorakit.adapter_configs(model)[name]
    if isinstance(config, lorakit.VeraConfig):
        a = delta.projections.vera_A[:, : layer.in_features].double()
        b = delta.projections.vera_B[: layer.out_features].double()
        return delta.vera_lambda_b.double()[:, None] * b @ (delta.vera_lambda_d.double()[:, None] * a)
    return expected_scaling(config, path) * delta.lora_B.detach().double() @ delta.lora_A.detach().double()


def dense_oracle(model: nn.Module, deltas: dict[str, Tensor]) -> nn.Module:
    """A float64 copy of `model` whose adapted layers are plain Linear layers holding W + deltas[path]."""
    oracle = copy.deepcopy(model)
    for path, layer in list(lorakit.adapted_layers(oracle)):
        weight = layer.weight.detach().double() + deltas.get(path, 0.0)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, child = path.rpartition(".")
        setattr(oracle.get_submodule(parent), child, linear)
    return oracle.double()


def paths(model: nn.Module) -> list[str]:
    return [path for path, _ in lorakit.adapted_layers(model)]


def logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits.double()


def assert_matches_oracle(model: nn.Module, deltas: dict[str, Tensor], inputs: dict[str, Tensor]) -> None:
    expected = logits(dense_oracle(model, deltas), inputs)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-4, atol=1e-4)


def two_lora_model() -> nn.Module:
    """Adapter "a" (rsLoRA, rank/alpha patterns) on q, v, up; adapter "b" on q, k, down: overlapping, not equal."""
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 6}, alpha_pattern={"v_proj": 3}), "a")
    randomize_adapters(model, seed=1, scale=0.3)
    lorakit.adapt(model, lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "down_proj"]), "b")
    randomize_adapters(model, seed=2, scale=0.3)
    return model


def target_delta(model: nn.Module, names: list[str], weights: list[float], path: str) -> Tensor:
    return sum(w * source_delta(model, n, path) for n, w in zip(names, weights))


def assert_close64(got: Tensor, expected: Tensor) -> None:
    """Equal up to the float32 rounding of the stored factors."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def new_delta(model: nn.Module, name: str, path: str) -> Tensor:
    adapter = model.get_submodule(path).adapters[name]
    assert adapter.scaling == 1.0
    return adapter.delta.lora_B.detach().double() @ adapter.delta.lora_A.detach().double()


# set_adapter / delete_adapter ------------------------------------------------------------------------------------


def test_one_and_several_active_adapters_match_the_dense_oracle() -> None:
    model = two_lora_model()
    inputs = model_input("llama")
    for names in (["a"], ["b"], ["a", "b"], ["b", "a"]):
        lorakit.set_adapter(model, names)
        deltas = {p: sum(source_delta(model, n, p) for n in names) for p in paths(model)}
        assert_matches_oracle(model, deltas, inputs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and any(".adapters.b." in n for n in trainable)


def test_delete_adapter_leaves_the_others_and_finally_the_plain_model() -> None:
    model = two_lora_model()
    inputs = model_input("llama")
    reference = logits(tiny_llama(), inputs)
    lorakit.set_adapter(model, ["a", "b"])
    lorakit.delete_adapter(model, "a")
    assert sorted(lorakit.adapter_configs(model)) == ["b"]
    assert sorted(p.rsplit(".", 1)[-1] for p in paths(model)) == ["down_proj", "down_proj", "k_proj", "k_proj",
                                                                   "q_proj", "q_proj"]
    assert_matches_oracle(model, {p: source_delta(model, "b", p) for p in paths(model)}, inputs)
    lorakit.delete_adapter(model, "b")
    assert paths(model) == [] and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, inputs), reference)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        lorakit.delete_adapter(model, "b")


# combine_adapters ------------------------------------------------------------------------------------------------


def test_cat_is_exactly_the_weighted_sum_with_rslora_patterns_and_missing_layers() -> None:
    model = two_lora_model()
    names, weights = ["a", "b"], [0.7, -1.3]
    combine_adapters(model, names, weights, "cat", new_name="mix")
    for path in paths(model):
        assert_close64(new_delta(model, "mix", path), target_delta(model, names, weights, path))
    assert model.get_submodule(Q0).adapters["mix"].delta.r == 4 + 3
    assert model.get_submodule(UP1).adapters["mix"].delta.r == 6
    assert model.get_submodule(Q0).active == ["b"]  # the active set is left as it was
    lorakit.set_adapter(model, "mix")
    deltas = {p: target_delta(model, names, weights, p) for p in paths(model)}
    assert_matches_oracle(model, deltas, model_input("llama"))


def best_rank_k(matrix: Tensor, k: int) -> Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


@pytest.mark.parametrize("svd_rank", [None, 2, 50])
def test_svd_is_the_best_rank_k_approximation(svd_rank: int | None) -> None:
    model = two_lora_model()
    names, weights = ["a", "b"], [1.1, 0.4]
    combine_adapters(model, names, weights, "svd", new_name="mix", svd_rank=svd_rank)
    for path in paths(model):
        target = target_delta(model, names, weights, path)
        adapters = model.get_submodule(path).adapters
        ranks = [adapters[n].delta.r for n in names if n in adapters]
        k = svd_rank or max(ranks)
        expected = target if k >= sum(ranks) else best_rank_k(target, k)
        assert adapters["mix"].delta.r == min(k, sum(ranks))
        assert_close64(new_delta(model, "mix", path), expected)


def test_linear_follows_its_documented_parameter_averaging() -> None:
    model = tiny_llama()
    for name, (alpha, rslora) in {"a": (8, True), "b": (3, False)}.items():
        config = lorakit.LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora, target_modules=["q_proj", "v_proj"])
        lorakit.adapt(model, config, name)
        randomize_adapters(model, seed=ord(name), scale=0.3)
    names, weights = ["a", "b"], [0.6, -0.9]
    combine_adapters(model, names, weights, "linear", new_name="mix")
    for path in paths(model):
        down = torch.zeros(4, 64, dtype=torch.float64)
        up = torch.zeros(64 if "q_proj" in path else 32, 4, dtype=torch.float64)
        for name, w in zip(names, weights):
            config = lorakit.adapter_configs(model)[name]
            c = w * expected_scaling(config, path)
            delta = model.get_submodule(path).adapters[name].delta
            down += math.copysign(math.sqrt(abs(c)), c) * delta.lora_A.detach().double()
            up += math.sqrt(abs(c)) * delta.lora_B.detach().double()
        assert_close64(new_delta(model, "mix", path), up @ down)


def test_linear_of_one_adapter_is_exact() -> None:
    model = two_lora_model()
    combine_adapters(model, ["a"], [-0.5], "linear", new_name="scaled")
    for path in paths(model):
        if "a" in model.get_submodule(path).adapters:
            assert_close64(new_delta(model, "scaled", path), -0.5 * source_delta(model, "a", path))


def test_vera_and_lora_combine_exactly_with_cat() -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), "vera")
    randomize_adapters(model, seed=4, scale=0.3)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), "lora")
    randomize_adapters(model, seed=5, scale=0.3)
    names, weights = ["vera", "lora"], [2.0, 0.5]
    combine_adapters(model, names, weights, "cat", new_name="mix")
    for path in paths(model):
        assert_close64(new_delta(model, "mix", path), target_delta(model, names, weights, path))


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_matches_peft_add_weighted_adapter_for_plain_lora(method: str, tmp_path: Path) -> None:
    model = tiny_llama()
    for name, alpha in (("a", 8), ("b", 3)):
        lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]), name)
        randomize_adapters(model, seed=alpha, scale=0.3)
        lorakit.save_adapter(model, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], [0.6, -0.9], "mix", combination_type=method)
    combine_adapters(model, ["a", "b"], [0.6, -0.9], method, new_name="mix")
    for path in paths(model):
        expected = theirs.base_model.model.get_submodule(path).get_delta_weight("mix").double()
        assert_close64(new_delta(model, "mix", path), expected)


def test_combined_adapter_saves_and_loads_in_lorakit_and_peft(tmp_path: Path) -> None:
    model = two_lora_model()
    combine_adapters(model, ["a", "b"], [0.7, -1.3], "cat", new_name="mix")
    lorakit.set_adapter(model, "mix")
    inputs = model_input("llama")
    expected = logits(model, inputs)
    lorakit.save_adapter(model, tmp_path, "mix")
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs, inputs), expected, rtol=1e-5, atol=1e-5)


def test_combining_conv1d_layers_of_gpt2() -> None:
    model = tiny_gpt2()
    for name in ("a", "b"):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]), name)
        randomize_adapters(model, seed=ord(name), scale=0.3)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", new_name="mix")
    assert lorakit.adapter_configs(model)["mix"].fan_in_fan_out
    lorakit.set_adapter(model, "mix")
    deltas = {p: target_delta(model, ["a", "b"], [1.0, 1.0], p) for p in paths(model)}
    assert_matches_oracle(model, deltas, model_input("gpt2"))


@pytest.mark.parametrize(("setup", "call", "message"), [
    ("plain", dict(names=["a", "zzz"], weights=[1, 1]), "unknown adapter"),
    ("plain", dict(names=["a", "b"], weights=[1]), "2 adapter names but 1 weights"),
    ("plain", dict(names=[], weights=[]), "names is empty"),
    ("plain", dict(names=["a", "a"], weights=[1, 1]), "repeat"),
    ("plain", dict(names=["a"], weights=[1], method="ties"), "unknown combination method"),
    ("plain", dict(names=["a"], weights=[1], new_name="b"), "already exists"),
    ("plain", dict(names=["a"], weights=[1], method="cat", svd_rank=2), "needs method='svd'"),
    ("plain", dict(names=["a"], weights=[1], new_name="half"), "invalid adapter name"),
    ("plain", dict(names=["a", "b"], weights=[1, 1], method="linear"), "equal ranks"),
    ("dora", dict(names=["a", "d"], weights=[1, 1], method="cat"), "DoRA"),
    ("bias", dict(names=["a", "bias"], weights=[1, 1], method="cat"), "trains biases"),
    ("vera", dict(names=["v"], weights=[1], method="linear"), "VeRA"),
])
def test_clear_errors(setup: str, call: dict, message: str) -> None:
    model = two_lora_model()
    if setup == "dora":
        lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "d")
    if setup == "bias":
        lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias")
    if setup == "vera":
        lorakit.adapt(model, lorakit.VeraConfig(r=4, target_modules=["q_proj"]), "v")
    before = sorted(lorakit.adapter_configs(model))
    call = {"method": "cat", "new_name": "mix", **call}
    with pytest.raises(ValueError, match=message):
        combine_adapters(model, **call)
    assert sorted(lorakit.adapter_configs(model)) == before


# mixed_batch -----------------------------------------------------------------------------------------------------


def three_method_model() -> nn.Module:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "lora")
    randomize_adapters(model, seed=1, scale=0.2)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            use_dora=True), "dora")
    randomize_adapters(model, seed=2, scale=0.2)
    lorakit.adapt(model, lorakit.VeraConfig(r=8, target_modules=["k_proj", "up_proj"]), "vera")
    randomize_adapters(model, seed=3, scale=0.5)
    return model


def alone(model: nn.Module, name: str, run: Callable[[], Tensor]) -> Tensor:
    """`run()` with only adapter `name` active ("__base__": adapters disabled)."""
    if name == "__base__":
        with lorakit.disable_adapters(model):
            return run()
    lorakit.set_adapter(model, name)
    return run()


def assert_each_sample_alone(model: nn.Module, names: list[str], ids: Tensor, routed: Tensor) -> None:
    """Row i of `routed` is what the model gives sample i with only adapter names[i]; no routing is left over."""
    for i, name in enumerate(names):
        with torch.no_grad():
            expected = alone(model, name, lambda i=i: model(input_ids=ids[i : i + 1]).logits)
        torch.testing.assert_close(routed[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    assert all(layer.routing is None for _, layer in lorakit.adapted_layers(model))


def test_mixed_batch_equals_each_sample_alone() -> None:
    model = three_method_model()
    names = ["vera", "lora", "__base__", "dora", "lora"]
    ids = model_input("llama", batch=len(names), seq=9)["input_ids"]
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model(input_ids=ids).logits
    assert_each_sample_alone(model, names, ids, mixed)


def test_mixed_batch_generate_equals_per_sample_generate() -> None:
    model = three_method_model()
    names = ["dora", "__base__", "lora", "vera"]
    ids = model_input("llama", batch=len(names), seq=6)["input_ids"]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model.generate(input_ids=ids, **options)
    for i, name in enumerate(names):
        with torch.no_grad():
            expected = alone(model, name, lambda i=i: model.generate(input_ids=ids[i : i + 1], **options))
        assert torch.equal(mixed[i : i + 1], expected)


def test_mixed_batch_rejects_unknown_names() -> None:
    model = three_method_model()
    with (
        pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"),
        lorakit.mixed_batch(model, ["lora", "nope"]),
    ):
        pass


# the adapter_names keyword (PEFT's per-sample API) ----------------------------------------------------------------


def test_adapter_names_keyword_routes_forward_like_each_sample_alone() -> None:
    model = three_method_model()
    names = ["vera", "lora", "__base__", "dora", "lora"]
    ids = model_input("llama", batch=len(names), seq=9)["input_ids"]
    lorakit.set_adapter(model, "dora")
    with torch.no_grad():
        routed = model(input_ids=ids, adapter_names=names).logits
        after = model(input_ids=ids).logits  # the call's routing ends with the call: the active adapter again
    assert_each_sample_alone(model, names, ids, routed)
    lorakit.set_adapter(model, "dora")
    with torch.no_grad():
        torch.testing.assert_close(after, model(input_ids=ids).logits, rtol=0, atol=0)
    assert all(layer.routing is None for _, layer in lorakit.adapted_layers(model))


def test_adapter_names_keyword_routes_generate() -> None:
    model = three_method_model()
    names = ["dora", "__base__", "lora", "vera"]
    ids = model_input("llama", batch=len(names), seq=6)["input_ids"]
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        routed = model.generate(input_ids=ids, adapter_names=names, **options)
        with lorakit.mixed_batch(model, names):
            expected = model.generate(input_ids=ids, **options)
    assert torch.equal(routed, expected)
    assert all(layer.routing is None for _, layer in lorakit.adapted_layers(model))


def test_adapter_names_keyword_matches_peft(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), "a")
    randomize_adapters(model, seed=1)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), "b")
    randomize_adapters(model, seed=2)
    lorakit.save_adapter(model, tmp_path / "a", "a")
    lorakit.save_adapter(model, tmp_path / "b", "b")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    names = ["b", "__base__", "a", "b"]
    ids = model_input("llama", batch=len(names), seq=7)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=names).logits,
                                   theirs(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, ids: m(input_ids=ids, adapter_names=["lora", "nope", "lora"]), ValueError, r"unknown adapter\(s\)"),
    (lambda m, ids: m(input_ids=ids, adapter_names=["lora", "vera"]), ValueError, "2 adapter names for a batch of 3"),
    (lambda m, ids: m(input_ids=ids, adapter_names="lora"), TypeError, "a list of adapter names"),
    (lambda m, ids: m.generate(input_ids=ids, adapter_names=["lora", "vera", "dora"], num_return_sequences=2,
                               do_sample=True, max_new_tokens=2, pad_token_id=0),
     ValueError, "3 adapter names for a batch of 6"),
    (lambda m, ids: m.generate(input_ids=ids, adapter_names=["lora", "vera", "dora"], num_beams=2,
                               max_new_tokens=2, pad_token_id=0), ValueError, "3 adapter names for a batch of 6"),
])
def test_adapter_names_that_cannot_be_routed_raise(call: Callable, error: type, message: str) -> None:
    model = three_method_model()
    ids = model_input("llama", batch=3, seq=5)["input_ids"]
    with torch.no_grad(), pytest.raises(error, match=message):
        call(model, ids)
    assert all(layer.routing is None for _, layer in lorakit.adapted_layers(model))


def test_adapter_names_keyword_leaves_with_the_adapters() -> None:
    model = three_method_model()
    assert "generate" in model.__dict__ and model._forward_pre_hooks
    lorakit.unload(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    copy_ = copy.deepcopy(three_method_model())  # a deep copy routes itself, not the original
    ids = model_input("llama", batch=2, seq=5)["input_ids"]
    with torch.no_grad():
        copy_.generate(input_ids=ids, adapter_names=["lora", "__base__"], max_new_tokens=2, pad_token_id=0)
