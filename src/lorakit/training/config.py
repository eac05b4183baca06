"""`TrainConfig`: every option of `lorakit train`. The command line is generated from its typed fields (flags are the
field names with dashes), and a YAML/TOML file can set any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..adapters.config import AdaLoraConfig, LoftQConfig, LoraConfig, VeraConfig

METHODS = ("lora", "dora", "vera", "adalora")
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
DEFAULT_SEQ_LEN = 256


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every option of `lorakit train` (flags are the field names with dashes)."""

    model: str = _opt("smollm2-135m", "built-in model name, local Hugging Face directory, or hub id")
    data: str | None = _opt(None, "training JSONL file (text, prompt/completion or messages); default: the "
                                  "built-in date-formatting task")
    eval_data: str | None = _opt(None, "evaluation JSONL file; default: a held-out fraction of --data")
    eval_fraction: float = _opt(0.05, "held-out share of --data when no --eval-data is given")
    output_dir: str = _opt("runs/lorakit", "where the adapter, checkpoints, metrics and plot go")
    method: str = _opt("lora", "adapter method", choices=METHODS)
    r: int = _opt(8, "rank (VeRA: size of the shared projections, e.g. 256); --r for short, but torchrun takes --r "
                     "for one of its own flags", flags=("--rank", "--r"))
    alpha: float = _opt(16.0, "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)")
    dropout: float = _opt(0.0, "dropout on the adapter input")
    targets: str = _opt("all-linear", "modules to adapt: 'all-linear', comma-separated names, or a regex")
    target_parameters: str | None = _opt(None, "also adapt these parameters in place (comma-separated names or "
                                               "suffixes), e.g. fused MoE experts: "
                                               "mlp.experts.gate_up_proj,mlp.experts.down_proj")
    add_tokens: str | None = _opt(None, "comma-separated new tokens: added to the tokenizer, the embedding grown, and "
                                        "only their rows trained (and the output head's rows when it is not tied)")
    rslora: bool = _opt(False, "rank-stabilized scaling alpha/sqrt(r)")
    target_r: int | None = _opt(None, "AdaLoRA: average rank kept per layer at the end (--rank is the initial "
                                      "rank); default half of --rank")
    adalora_tinit: int = _opt(0, "AdaLoRA: steps before ranks start to be pruned")
    adalora_tfinal: int = _opt(0, "AdaLoRA: final steps that train the pruned ranks without pruning")
    init: str = _opt("default", "adapter initialisation: default (A kaiming-uniform, B = 0), gaussian, pissa (the "
                                "base's top-r singular vectors train, the rest stays frozen), olora (QR), loftq (the "
                                "adapted layers become NF4 with an adapter that makes up their quantization error; "
                                "needs --quantize nf4); pissa, olora and loftq read the dense base, which is "
                                "quantized after them with --quantize nf4", choices=INITS)
    pissa_niter: int | None = _opt(None, "with --init pissa: a randomized SVD with this many subspace iterations "
                                         "(fast on large layers) instead of the exact one")
    loftq_iter: int = _opt(1, "with --init loftq: alternating quantize/SVD rounds")
    quantize: str | None = _opt(None, "quantize the frozen base while it loads: 'nf4' (QLoRA, with double "
                                      "quantization)", choices=(None, "nf4"))
    dtype: str = _opt("auto", "dtype of the frozen base's dense tensors and the NF4 compute dtype (adapters train in "
                              "float32); auto: float32 on CPUs without native bfloat16, bfloat16 on CUDA",
                      choices=("auto", "float32", "bfloat16", "float16"))
    loraplus_ratio: float | None = _opt(None, "LoRA+: learning-rate ratio of B over A (e.g. 16); off by default")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(10, "linear warmup steps, then cosine decay to zero")
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)")
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is not given")
    batch_size: int = _opt(8, "examples per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    seq_len: int | None = _opt(None, "maximum tokens per example (longer ones are truncated and counted); default "
                                     f"{DEFAULT_SEQ_LEN}, or the model's context when that is shorter")
    pack: bool = _opt(False, "pack examples into blocks of --seq-len tokens")
    group_by_length: bool = _opt(False, "fill each batch with examples of similar length (sorted within runs of "
                                        "50 batches, batch order shuffled): less padding, but less varied batches")
    chat: bool = _opt(False, "render prompt/completion records through the tokenizer's chat template")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    bf16: bool = _opt(False, "bfloat16 autocast for the forward pass")
    seed: int = _opt(0, "seed for adapter init, data order and dropout")
    eval_every: int = _opt(0, "evaluate every N steps (0: only before and after training)")
    eval_samples: int = _opt(100, "held-out examples scored by exact match")
    save_every: int = _opt(50, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    log_every: int = _opt(10, "write training metrics every N steps")
    resume: bool = _opt(False, "continue from the checkpoint in --output-dir")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    fsdp: bool = _opt(False, "under torchrun: shard the frozen base over the processes with FSDP2 (adapters stay "
                             "whole on every process) instead of replicating it with DDP")
    report_to: str = _opt("none", "also send the metrics to trackers: none, or a comma-separated subset of "
                                  "tensorboard, mlflow, trackio, wandb (local files under --output-dir, W&B offline)")
    builtin_train_size: int = _opt(800, "size of the built-in task's training split")

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
