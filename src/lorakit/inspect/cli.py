"""The `lorakit inspect` subcommand: plan / adapter / keys."""

from __future__ import annotations

import argparse

from ..formats.peft import load_adapter, read_adapter_config
from ..training.options import check_output_file, choice, positive_int, text
from .analysis import INSPECT_ADAPTER, analyze_adapter, format_analysis, plot_analysis
from .keys import DEFAULT_PNG_LAYERS, format_key_values, key_value_maps, plot_key_values
from .plan import DTYPE_BYTES, METHODS, SHAPES, format_plan, plan


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `inspect` with modes plan / adapter / keys; each mode sets `func(args) -> int` on the namespace."""
    parser = subparsers.add_parser("inspect", help="plan an adapter's size and memory, or look inside a saved one")
    modes = parser.add_subparsers(dest="inspect_mode", required=True, parser_class=type(parser))

    p = modes.add_parser("plan", help="parameters, file size and memory from a model's dimensions")
    p.add_argument("--model", "--shape", dest="shape", type=text(), required=True,
                   help=f"a named shape ({', '.join(sorted(SHAPES))}), a built-in model or a local model directory "
                        "(only its config.json is read)")
    p.add_argument("--method", type=choice(*METHODS), choices=METHODS, default="lora")
    p.add_argument("--rank", "--r", dest="r", type=positive_int(), default=8)
    p.add_argument("--targets", type=text(), default="q_proj,v_proj",
                   help="comma-separated module names or 'all-linear'")
    p.add_argument("--batch", type=positive_int(), default=1)
    p.add_argument("--seq", type=positive_int(), default=512)
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--quantize", type=choice("nf4"), choices=("nf4",), help="plan a run on an NF4 base (as lorakit train --quantize nf4)")
    p.add_argument("--dtype", type=choice("auto", *DTYPE_BYTES), default="auto", choices=("auto", *DTYPE_BYTES),
                   help="the run's dtype for dense tensors and NF4 compute (as lorakit train --dtype)")
    p.set_defaults(func=_cmd_plan)

    a = modes.add_parser("adapter", help="per-layer norms, spectra and effective ranks of a saved adapter")
    a.add_argument("directory", type=text())
    a.add_argument("--model", type=text(),
                   help="base model (name or directory): adds magnitude/direction change, needed for VeRA")
    a.add_argument("--png", type=text(), help="write a figure here (needs matplotlib)")
    a.set_defaults(func=_cmd_adapter)

    k = modes.add_parser("keys", help="which rank components fire on which tokens of a text")
    k.add_argument("directory", type=text())
    k.add_argument("--model", type=text(), required=True, help="base model (name or directory)")
    k.add_argument("--text", type=text(), required=True)
    k.add_argument("--top", type=positive_int(), default=3, help="components and tokens shown per layer")
    k.add_argument("--png", type=text(), help="write a heat map here (needs matplotlib)")
    k.add_argument("--layers", type=positive_int(), default=DEFAULT_PNG_LAYERS, help="layers in the heat map")
    k.set_defaults(func=_cmd_keys)
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    print(format_plan(plan(args.shape, args.method, args.r, args.targets, args.batch, args.seq, args.checkpointing,
                           args.quantize, args.dtype)))
    return 0


def _check_png(png: str | None) -> None:
    """Before any work: a --png that can be written, and matplotlib to draw it."""
    if png is None:
        return
    check_output_file(png, "--png")
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError:
        raise ValueError("--png needs matplotlib, which is not installed: pip install matplotlib") from None


def _cmd_adapter(args: argparse.Namespace) -> int:
    _check_png(args.png)
    rows = analyze_adapter(args.directory, args.model)
    print(format_analysis(rows))
    if args.png:
        print(f"wrote {plot_analysis(rows, args.png)}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..models.load import load_model

    _check_png(args.png)
    read_adapter_config(args.directory)  # a missing adapter fails before the model loads
    model, tokenizer = load_model(args.model)
    load_adapter(model, args.directory, INSPECT_ADAPTER)
    maps = key_value_maps(model, tokenizer, args.text, INSPECT_ADAPTER)
    print(format_key_values(maps, args.top))
    if args.png:
        print(f"wrote {plot_key_values(maps, args.png, args.layers)}")
    return 0
