"""`TrainConfig`: every option of `lorakit train`. The command line is generated from its typed fields (flags are the
field names with dashes), and a YAML/TOML file can set any of them. Each field declares its value rule
(`options.Rule`) once: flags, config files and `TrainConfig(...)` in Python all go through it.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any

from ..adapters.config import AdaLoraConfig, LoftQConfig, LoraConfig, VeraConfig
from .options import (
    FLAG,
    SEED,
    THREADS,
    Rule,
    choice,
    finite_float,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    text,
)
from .trackers import parse_report_to

METHODS = ("lora", "dora", "vera", "adalora")
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_SEQ_LEN = 256


def _opt(default: Any, rule: Rule, help: str, **kwargs: Any) -> Any:
    """A field with its value rule and help text (and `flags`: its command-line spellings, default --field-name)."""
    return field(default=default, metadata={"rule": rule, "help": help, **kwargs})


def convert_field(f: Field[Any], value: Any) -> Any:
    """`value` through the rule of TrainConfig field `f`; a ValueError names the field (as its flag)."""
    try:
        return f.metadata["rule"].convert(value)
    except ValueError as error:
        raise ValueError(f"{f.name} ({flag_of(f)}): {error}") from None


def flag_of(f: Field[Any]) -> str:
    """The first command-line spelling of a TrainConfig field."""
    return f.metadata.get("flags", ("--" + f.name.replace("_", "-"),))[0]


@dataclass
class TrainConfig:
    """Every option of `lorakit train` (flags are the field names with dashes)."""

    model: str = _opt("smollm2-135m", text(), "built-in model name, local Hugging Face directory, or hub id")
    data: str | None = _opt(None, text(optional=True), "training JSONL file (text, prompt/completion or messages); "
                                                       "default: the built-in date-formatting task")
    eval_data: str | None = _opt(None, text(optional=True), "evaluation JSONL file; default: a held-out fraction of "
                                                            "--data")
    eval_fraction: float = _opt(0.05, fraction(), "held-out share of --data when no --eval-data is given")
    output_dir: str = _opt("runs/lorakit", text(), "where the adapter, checkpoints, metrics and plot go")
    method: str = _opt("lora", choice(*METHODS), "adapter method")
    r: int = _opt(8, positive_int(), "rank (VeRA: size of the shared projections, e.g. 256); --r for short, but "
                                     "torchrun takes --r for one of its own flags", flags=("--rank", "--r"))
    alpha: float = _opt(16.0, positive_float(), "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with "
                                                "--rslora)")
    dropout: float = _opt(0.0, finite_float(0.0, 1.0, high_open=True), "dropout on the adapter input")
    targets: str = _opt("all-linear", text(), "modules to adapt: 'all-linear', comma-separated names, or a regex")
    target_parameters: str | None = _opt(None, text(optional=True), "also adapt these parameters in place "
                                         "(comma-separated names or suffixes), e.g. fused MoE experts: "
                                         "mlp.experts.gate_up_proj,mlp.experts.down_proj")
    add_tokens: str | None = _opt(None, text(optional=True), "comma-separated new tokens: added to the tokenizer, the "
                                  "embedding grown, and only their rows trained (and the output head's rows when it "
                                  "is not tied)")
    rslora: bool = _opt(False, FLAG, "rank-stabilized scaling alpha/sqrt(r)")
    target_r: int | None = _opt(None, positive_int(optional=True), "AdaLoRA: average rank kept per layer at the end "
                                "(--rank is the initial rank); default half of --rank")
    adalora_tinit: int = _opt(0, non_negative_int(), "AdaLoRA: steps before ranks start to be pruned")
    adalora_tfinal: int = _opt(0, non_negative_int(), "AdaLoRA: final steps that train the pruned ranks without "
                                                      "pruning")
    init: str = _opt("default", choice(*INITS), "adapter initialisation: default (A kaiming-uniform, B = 0), "
                     "gaussian, pissa (the base's top-r singular vectors train, the rest stays frozen), olora (QR), "
                     "loftq (the adapted layers become NF4 with an adapter that makes up their quantization error; "
                     "needs --quantize nf4); pissa, olora and loftq read the dense base, which is quantized after "
                     "them with --quantize nf4")
    pissa_niter: int | None = _opt(None, non_negative_int(optional=True), "with --init pissa: a randomized SVD with "
                                   "this many subspace iterations (fast on large layers) instead of the exact one")
    loftq_iter: int = _opt(1, positive_int(), "with --init loftq: alternating quantize/SVD rounds")
    quantize: str | None = _opt(None, choice("nf4", optional=True), "quantize the frozen base while it loads: 'nf4' "
                                "(QLoRA, with double quantization)")
    dtype: str = _opt("auto", choice(*DTYPES), "dtype of the frozen base's dense tensors and the NF4 compute dtype "
                      "(adapters train in float32); auto: float32 on CPUs without native bfloat16, bfloat16 on CUDA")
    loraplus_ratio: float | None = _opt(None, positive_float(optional=True), "LoRA+: learning-rate ratio of B over A "
                                        "(e.g. 16); off by default")
    lr: float = _opt(1e-3, positive_float(), "peak learning rate")
    weight_decay: float = _opt(0.0, finite_float(0.0), "AdamW weight decay")
    warmup_steps: int = _opt(10, non_negative_int(), "linear warmup steps, then cosine decay to zero")
    max_steps: int | None = _opt(None, positive_int(optional=True), "optimizer steps (overrides --epochs)")
    epochs: float = _opt(1.0, positive_float(), "passes over the training data when --max-steps is not given")
    batch_size: int = _opt(8, positive_int(), "examples per micro-batch (per process)")
    grad_accum: int = _opt(1, positive_int(), "micro-batches per optimizer step")
    max_grad_norm: float = _opt(1.0, finite_float(0.0), "gradient clipping norm (0 disables)")
    seq_len: int | None = _opt(None, positive_int(optional=True), "maximum tokens per example (longer ones are "
                               f"truncated and counted); default {DEFAULT_SEQ_LEN}, or the model's context when that "
                               "is shorter")
    pack: bool = _opt(False, FLAG, "pack examples into blocks of --seq-len tokens")
    group_by_length: bool = _opt(False, FLAG, "fill each batch with examples of similar length (sorted within runs "
                                 "of 50 batches, batch order shuffled): less padding, but less varied batches")
    chat: bool = _opt(False, FLAG, "render prompt/completion records through the tokenizer's chat template")
    gradient_checkpointing: bool = _opt(False, FLAG, "recompute activations in backward to save memory")
    bf16: bool = _opt(False, FLAG, "bfloat16 autocast for the forward pass")
    seed: int = _opt(0, SEED, "seed for adapter init, data order and dropout")
    eval_every: int = _opt(0, non_negative_int(), "evaluate every N steps (0: only before and after training)")
    eval_samples: int = _opt(100, non_negative_int(), "held-out examples scored by exact match")
    save_every: int = _opt(50, non_negative_int(), "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    log_every: int = _opt(10, positive_int(), "write training metrics every N steps")
    resume: bool = _opt(False, FLAG, "continue from the checkpoint in --output-dir")
    attn_implementation: str = _opt("auto", text(), "attention kernel, as transformers names it (sdpa, eager, "
                                    "flash_attention_2, ...); auto: the model's default, except that on the CPU a "
                                    "model running SDPA takes eager attention for calls with few score elements, "
                                    "where it is faster")
    threads: int | None = _opt(None, THREADS, "torch CPU threads, at most the CPUs this machine has (default: "
                                              "torch's choice)")
    fsdp: bool = _opt(False, FLAG, "under torchrun: shard the frozen base over the processes with FSDP2 (adapters "
                                   "stay whole on every process) instead of replicating it with DDP")
    report_to: str = _opt("none", text(check=parse_report_to), "also send the metrics to trackers: none, or a "
                          "comma-separated subset of tensorboard, mlflow, trackio, wandb (local files under "
                          "--output-dir, W&B offline)")
    builtin_train_size: int = _opt(800, positive_int(), "size of the built-in task's training split")

    def __post_init__(self) -> None:
        """Every field through its rule (`options.Rule`): the same checks as the flags and config files get."""
        for f in fields(self):
            setattr(self, f.name, convert_field(f, getattr(self, f.name)))

    def adapter_config(self) -> LoraConfig | VeraConfig:
        targets = self.target_spec()
        parameters = tuple(p.strip() for p in self.target_parameters.split(",") if p.strip()) \
            if self.target_parameters else None
        if self.method == "vera":
            if self.init != "default":
                raise ValueError(f"--init {self.init} initialises LoRA factors; VeRA has none")
            if parameters:
                raise ValueError("--target-parameters takes LoRA; VeRA adapts linear layers only")
            return VeraConfig(r=self.r, target_modules=targets, vera_dropout=self.dropout)
        if self.method == "adalora":
            if self.init != "default" or parameters or self.add_tokens:
                raise ValueError("--method adalora takes its own initialisation and adapts linear layers only "
                                 "(no --init, --target-parameters or --add-tokens)")
            return AdaLoraConfig(init_r=self.r, target_r=self.target_r or max(1, self.r // 2), lora_alpha=self.alpha,
                                 lora_dropout=self.dropout, target_modules=targets, tinit=self.adalora_tinit,
                                 tfinal=self.adalora_tfinal)
        if self.init == "loftq" and self.quantize != "nf4":
            raise ValueError("--init loftq quantizes the adapted layers to NF4: add --quantize nf4")
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError("--pissa-niter goes with --init pissa")
        init: bool | str = {"default": True, "pissa": "pissa" if self.pissa_niter is None else
                            f"pissa_niter_{self.pissa_niter}"}.get(self.init, self.init)
        loftq = LoftQConfig(loftq_iter=self.loftq_iter) if self.init == "loftq" else None
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_rslora=self.rslora, use_dora=self.method == "dora", init_lora_weights=init,
                          loftq_config=loftq, target_parameters=parameters)

    @property
    def init_reads_base(self) -> bool:
        """The adapter init reads the dense base weights (PiSSA, OLoRA, LoftQ): quantize after adapting."""
        return self.init in ("pissa", "olora", "loftq")

    def target_spec(self) -> str | tuple[str, ...]:
        if self.targets == "all-linear" or not all(c.isalnum() or c in "_,. " for c in self.targets):
            return self.targets  # "all-linear" or a regex
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())
