"""The `lorakit` command: train, eval, generate, merge, quantize, export, inspect.

`lorakit train` flags are generated from `TrainConfig`'s fields; `--config FILE` (YAML or TOML) sets any of them and
flags given on the command line win. Every option of every subcommand reads its value through a rule
(`training/options.py`: range, finiteness, type, choices), the train options through the same rules as `TrainConfig`
and its config files; output paths are checked before any work. Bad input ends with one line on stderr,
`lorakit: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .training.options import (
    FLAG,
    SEED,
    check_output_dir,
    check_output_file,
    choice,
    finite_float,
    non_negative_int,
    one_line,
    positive_int,
    quote,
    show,
    text,
)

ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, NotImplementedError, KeyError)
CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")
MERGE_DTYPES = ("float32", "bfloat16", "float16")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 100.0  # far tinier ones make logits / temperature inf (1e-300 is 0 in float32)


def _sampling_temperature(value: float) -> None:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {value!r}")


TEMPERATURE = finite_float(0.0, MAX_TEMPERATURE, check=_sampling_temperature)


class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (a flag added later never changes what an old command line means) whose
    errors are one line, `lorakit: error: ...`, and exit status 2, like every other refusal (--help shows usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lorakit: error: {one_line(message)} (see {self.prog} --help)\n")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of `cls`: --field-name (or the field's `flags`), read by the field's `rule`, with its help
    text and default; bool fields get --name / --no-name."""
    for f in dataclasses.fields(cls):
        rule = f.metadata["rule"]
        flags = f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        if rule is FLAG:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=rule, default=f.default, choices=rule.choices or None,
                                help=help_text)


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or TOML (.toml) file, as written (keys may use dashes or underscores).
    A file that cannot be read or parsed, or that is no mapping of names to values, raises a one-line error naming it."""
    file = Path(path)
    if file.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"config file {quote(path)}: use a .yaml, .yml or .toml file")
    try:
        content = file.read_bytes().decode("utf-8")
        data = _parse_toml(content) if file.suffix == ".toml" else _parse_yaml(content)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {quote(path)} not found") from None
    except OSError as error:
        raise ValueError(f"config file {quote(path)}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {quote(path)}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise ValueError(f"config file {quote(path)}: nested too deeply") from None
    except ValueError as error:
        raise ValueError(f"config file {quote(path)}: {one_line(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004
            f"config file {quote(path)}: expected a mapping of option names to values, got {type(data).__name__}")
    options: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(f"config file {quote(path)}: option names are text, got {show(key)}")  # noqa: TRY004
        name = key.replace("-", "_")
        if name in options:
            raise ValueError(f"config file {quote(path)}: option {show(key)} given twice")
        options[name] = value
    return options


def _parse_toml(content: str) -> Any:
    import tomllib

    return tomllib.loads(content)  # TOMLDecodeError is a ValueError with the line and column


def _parse_yaml(content: str) -> Any:
    """YAML through the safe loader (no Python tags); its errors become ValueError with the problem and line."""
    import yaml

    try:
        return yaml.safe_load(content)
    except yaml.MarkedYAMLError as error:
        where = f" (line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1})" \
            if error.problem_mark else ""
        raise ValueError(f"not valid YAML: {error.problem or error.context}{where}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"not valid YAML: {error}") from None


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """`--config FILE` of `lorakit train`: its values, through the same rules as the flags, become the defaults."""
    from .training.config import TrainConfig, convert_field

    pre = Parser(prog=parser.prog, add_help=False)
    pre.add_argument("--config", type=text())
    known, _ = pre.parse_known_args(argv)
    if known.config:
        options = read_config_file(known.config)
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        unknown = [name for name in options if name not in fields]
        if unknown:
            raise ValueError(f"config file {quote(known.config)}: unknown option(s) "
                             + ", ".join(show(name) + _close(name, fields) for name in unknown))
        try:
            parser.set_defaults(**{name: convert_field(fields[name], value) for name, value in options.items()})
        except ValueError as error:
            raise ValueError(f"config file {quote(known.config)}: {error}") from None


# -- subcommands ------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    check_output_dir(config.output_dir, "--output-dir")
    result = train(config)
    return 130 if result.get("interrupted") else 0


def _load_with_adapter(model_name: str, adapter: str | None, dtype: str = "auto") -> tuple[Any, Any]:
    from .formats.peft import load_adapter
    from .models.load import load_model

    model, tokenizer = load_model(model_name, dtype)
    if adapter:
        load_adapter(model, adapter)
    return model.eval(), tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    from .training import TrainConfig, load_datasets
    from .training.evaluate import evaluate_exact_match, evaluate_loss

    model, tokenizer = _load_with_adapter(args.model, args.adapter)
    config = TrainConfig(model=args.model, data=args.data, eval_data=args.data, seq_len=args.seq_len, chat=args.chat,
                         eval_samples=args.eval_samples)
    data = load_datasets(config, tokenizer, getattr(model.config, "max_position_embeddings", None)).eval
    if not data:
        raise ValueError("no evaluation examples")
    result = evaluate_loss(model, data, args.batch_size, tokenizer.pad_token_id)
    result |= evaluate_exact_match(model, tokenizer, data[: args.eval_samples])
    print(f"examples: {len(data)}  loss: {result['eval_loss']:.4f}  perplexity: {result['eval_ppl']:.2f}"
          + (f"  exact match: {100 * result['exact_match']:.1f}% of {result['n_scored']}" if "exact_match" in result
             else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    model, tokenizer = _load_with_adapter(args.model, args.adapter)
    if args.chat:
        if tokenizer.chat_template is None:
            raise ValueError(f"{args.model} has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    _check_context(model.config, ids.shape[1], args.max_new_tokens)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 \
        else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                       streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling)
    return 0


def _check_context(config: Any, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse a generation that would run past the model's context (position embeddings) or has no prompt."""
    if prompt_tokens == 0:
        raise ValueError("--prompt gives no tokens")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + new_tokens > context:
        raise ValueError(f"--max-new-tokens {new_tokens} after a prompt of {prompt_tokens} tokens exceeds the model's "
                         f"context of {context} tokens")


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from .adapters.model import merge_and_unload

    check_output_dir(args.output_dir, "--output-dir")
    model, tokenizer = _load_with_adapter(args.model, args.adapter, "float32")  # merge at full precision
    dtype = getattr(torch, args.dtype)
    merged = merge_and_unload(model, dtype=dtype)
    merged.config.dtype = dtype
    out = Path(args.output_dir)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"lorakit: merged model written to {out} ({args.dtype})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .formats.quantized import save_quantized
    from .models.load import load_model
    from .quant.nf4 import NF4Linear
    from .quant.quantize import memory_footprint

    check_output_dir(args.output_dir, "--output-dir")
    model, tokenizer = load_model(args.model, args.dtype, quantize="nf4", double_quant=not args.no_double_quant,
                                  progress=True)
    dense = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    out = save_quantized(model, args.output_dir)
    tokenizer.save_pretrained(out)
    footprint = memory_footprint(model)
    print(f"lorakit: NF4 model written to {out}: {dense:,} quantized weights in "
          f"{(footprint.nf4_codes + footprint.nf4_scales) / 2**20:.1f} MiB, {footprint.total / 2**20:.1f} MiB in all")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_gguf

    check_output_file(args.output, "--output")
    path = export_gguf(args.adapter, args.output, model=args.model, merged=args.merged, outtype=args.outtype)
    kind = "merged model" if args.merged else "LoRA adapter (llama.cpp --lora)"
    print(f"lorakit: GGUF {kind} written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .training.config import DTYPES, TrainConfig

    parser = Parser(prog="lorakit", description="Parameter-efficient fine-tuning: LoRA, LoRA+, QLoRA (NF4), DoRA, "
                    "VeRA; adapters in PEFT's format.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = sub.add_parser("train", help="fine-tune an adapter (defaults: SmolLM2-135M on the built-in task)")
    train.add_argument("--config", type=text(), help="YAML or TOML file with any of the options below (flags win)")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(func=cmd_train)

    def model_and_adapter(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", type=text(), default="smollm2-135m", help="built-in name, local HF directory or hub id")
        p.add_argument("--adapter", type=text(), help="adapter directory (PEFT format); omit for the base model")

    evaluate = sub.add_parser("eval", help="loss, perplexity and exact match of a model (+ adapter) on data")
    model_and_adapter(evaluate)
    evaluate.add_argument("--data", type=text(), help="JSONL file; default: the built-in task's held-out split")
    evaluate.add_argument("--seq-len", type=positive_int(), help="maximum tokens per example (default: 256, or the model's "
                          "context when that is shorter)")
    evaluate.add_argument("--batch-size", type=positive_int(), default=16)
    evaluate.add_argument("--eval-samples", type=non_negative_int(), default=100, help="examples scored by exact match")
    evaluate.add_argument("--chat", action="store_true", help="render prompt/completion through the chat template")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="generate text (streamed) from a prompt")
    model_and_adapter(generate)
    generate.add_argument("--prompt", type=text(), required=True)
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user turn of the chat template")
    generate.add_argument("--max-new-tokens", type=positive_int(), default=64,
                          help="tokens to generate; with the prompt, at most the model's context")
    generate.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                          help=f"0: greedy decoding; else sampling, at most {MAX_TEMPERATURE:g}")
    generate.add_argument("--top-p", type=finite_float(0.0, 1.0, low_open=True), default=0.9,
                          help="nucleus sampling: the smallest set of tokens with this much probability")
    generate.add_argument("--seed", type=SEED, default=0)
    generate.set_defaults(func=cmd_generate)

    merge = sub.add_parser("merge", help="write base + adapter as one Hugging Face model directory")
    model_and_adapter(merge)
    merge.add_argument("--output-dir", type=text(), required=True)
    merge.add_argument("--dtype", type=choice(*MERGE_DTYPES), default="float32", choices=MERGE_DTYPES)
    merge.set_defaults(func=cmd_merge)

    quant = sub.add_parser("quantize", help="save an NF4 (QLoRA) copy of a model, to quantize only once")
    quant.add_argument("--model", type=text(), default="smollm2-135m")
    quant.add_argument("--output-dir", type=text(), required=True)
    quant.add_argument("--no-double-quant", action="store_true", help="plain float32 block scales (4.5 bits/weight)")
    quant.add_argument("--dtype", type=choice(*DTYPES), default="auto", choices=DTYPES,
                       help="dtype of the dense tensors (embeddings, norms, output head) and the NF4 compute dtype")
    quant.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="GGUF for llama.cpp, Ollama, LM Studio: a LoRA adapter (--lora) or, with "
                            "--merged, the whole merged model")
    export.add_argument("--adapter", type=text(), help="adapter directory (PEFT format); with --merged it may be omitted to "
                        "convert the base alone")
    export.add_argument("--model", type=text(), help="base model: built-in name, local HF directory or hub id (default: the one "
                        "adapter_config.json names)")
    export.add_argument("--merged", action="store_true", help="write base + adapter merged, as a complete GGUF model")
    export.add_argument("--output", type=text(), required=True, help="the .gguf file to write")
    export.add_argument("--outtype", type=choice(*OUTTYPES), choices=OUTTYPES,
                        help="tensor type (default: f32 for adapters, f16 for merged models; q8_0 merged only)")
    export.set_defaults(func=cmd_export)

    from .inspect.cli import register_cli

    register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lorakit prints its own progress; keep stderr for errors
    hf_logging.set_verbosity_error()
    parser = build_parser()
    try:
        if argv and argv[0] == "train":
            _apply_config_file(parser._subparsers._group_actions[0].choices["train"], argv[1:])
        args = parser.parse_args(argv)
        return args.func(args)
    except ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"lorakit: error: {one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
