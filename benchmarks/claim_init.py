"""The initialisation papers' claims at small scale, on the same runs as claim_finetune.py (SmolLM2-135M, date task).

7. LoftQ (Li et al. 2023, arXiv:2310.08659, §4) and PiSSA (Meng et al. 2024, arXiv:2404.02948, §5, QPiSSA): starting
   the adapter from the weight (LoftQ: from the NF4 quantization error; PiSSA: from the principal singular
   components, the residual quantized) closes QLoRA's gap to LoRA on the dense base. Goal here: within 5% of LoRA.
8. AdaLoRA (Zhang et al. 2023, arXiv:2303.10512, §4): allocating rank by importance beats LoRA at the same final
   budget (init_r = 12 pruned to an average of 8 per layer, against LoRA r = 8).

    python benchmarks/claim_init.py             # 14 runs (2 seeds), ≈ 5 min on 2 quiet cores
    python benchmarks/claim_init.py --quick     # 3 runs of 3 steps: checks the pipeline, not the claims
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from claim_finetune import RESULT_HEADER, Budget, Lab, Run, Section, mean_std, result_row
from report import add_report_options, emit, pyplot, save_figure, table
from torch.optim.optimizer import register_optimizer_step_post_hook

import lorakit
from lorakit.models import load_model


@dataclass(frozen=True)
class InitRun(Run):
    init: str = "default"  # default | loftq | pissa | adalora (init_r = 1.5·r pruned to r)

    @property
    def label(self) -> str:
        if self.init == "adalora":
            return f"AdaLoRA r={3 * self.r // 2}→{self.r} all linear"
        name = {"loftq": "LoftQ", "pissa": "QPiSSA"}.get(self.init)
        return f"{name} r={self.r} all linear (NF4)" if name else super().label


class InitLab(Lab):
    """Lab whose models may start from the weight (LoftQ, PiSSA) or prune ranks (AdaLoRA)."""

    def _model(self, run: Run) -> torch.nn.Module:
        self.start_loss.clear()  # each initialisation starts from its own loss, even on the same base
        init = getattr(run, "init", "default")
        if init == "default":
            return super()._model(run)
        model, _ = load_model("smollm2-135m")
        torch.manual_seed(run.seed)
        if init == "adalora":
            config = lorakit.AdaLoraConfig(init_r=3 * run.r // 2, target_r=run.r, lora_alpha=2 * run.r,
                                           target_modules="all-linear", total_step=self.budget.steps,
                                           tinit=self.budget.steps // 8, tfinal=self.budget.steps // 4)
            return _with_allocator(lorakit.adapt(model, config))
        options = {"loftq_config": lorakit.LoftQConfig(loftq_iter=2)} if init == "loftq" else {}
        lorakit.adapt(model, lorakit.LoraConfig(r=run.r, lora_alpha=2 * run.r, target_modules="all-linear",
                                                init_lora_weights=init, **options))
        return lorakit.quantize(model)  # QPiSSA's residual and every other layer; LoftQ's layers are NF4 already


def _with_allocator(model: torch.nn.Module) -> torch.nn.Module:
    """AdaLoRA in Lab's plain loop: the penalty joins the loss in a forward hook, the allocator runs after each
    optimizer step (a global post-step hook, removed once the schedule is done)."""
    allocator = lorakit.RankAllocator(model)
    total = allocator.config.total_step
    steps = iter(range(total))

    def add_penalty(_: torch.nn.Module, __: Any, output: Any) -> Any:
        if model.training and getattr(output, "loss", None) is not None:
            output.loss = output.loss + allocator.orthogonal_penalty()
        return output

    def allocate(*_: Any) -> None:
        step = next(steps)
        allocator.update_and_allocate(step)
        if step == total - 1:
            handle.remove()

    model.register_forward_hook(add_penalty)
    handle = register_optimizer_step_post_hook(allocate)
    return model


def claim_init(lab: Lab, seeds: int, rank: int) -> Section:
    plt = pyplot()
    cases = [Run(r=rank), Run(r=rank, nf4=True), InitRun(r=rank, init="loftq"), InitRun(r=rank, init="pissa")]
    outs = [lab.seeds(case, seeds) for case in cases]
    finals = [[o.final_loss for o in g] for g in outs]
    starts = [g[0].curve[0][1] for g in outs]
    rows = [[*result_row(g), f"{start:.3f}"] for g, start in zip(outs, starts)]
    fig, ax = plt.subplots(figsize=(6, 4))
    means, stds = zip(*(mean_std(f) for f in finals))
    ax.bar(range(len(cases)), means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C3"])
    ax.set_xticks(range(len(cases)), ["LoRA", "QLoRA", "LoftQ", "QPiSSA"])
    ax.set(ylabel="held-out answer loss", title=f"NF4 bases at r={rank}, all linear layers")
    lora = means[0]
    verdicts = [f"{name} {m:.4f} ({m / lora - 1:+.1%} vs LoRA {lora:.4f})"
                for name, m in zip(("QLoRA", "LoftQ", "QPiSSA"), means[1:])]
    held = [name for name, m in zip(("LoftQ", "QPiSSA"), means[2:]) if m <= 1.05 * lora]
    sentence = (f"{'; '.join(verdicts)}. Claim (starting from the weight closes QLoRA's gap, within 5% of LoRA "
                f"here): **{'held for ' + ' and '.join(held) if held else 'did not hold'}**.")
    return Section(table([*RESULT_HEADER, "loss at step 0"], rows) + "\n\n" + sentence, fig)


def claim_adalora(lab: Lab, seeds: int, rank: int, lrs: Sequence[float]) -> Section:
    plt = pyplot()
    outs = [lab.seeds(Run(r=rank), seeds), *(lab.seeds(InitRun(r=rank, init="adalora", lr=lr), seeds) for lr in lrs)]
    finals = [[o.final_loss for o in g] for g in outs]
    fig, ax = plt.subplots(figsize=(6, 4))
    means, stds = zip(*(mean_std(f) for f in finals))
    ax.bar(range(len(outs)), means, yerr=stds, capsize=4, color=["C0"] + ["C4"] * len(lrs))
    ax.set_xticks(range(len(outs)), [f"LoRA r={rank}"] + [f"AdaLoRA {3 * rank // 2}→{rank}\nlr {lr:g}" for lr in lrs])
    ax.set(yscale="log", ylabel="held-out answer loss", title="AdaLoRA vs LoRA at the same final rank budget")
    best = min(range(1, len(outs)), key=lambda i: means[i])
    better = means[best] < means[0] - (stds[0] + stds[best])
    sentence = (f"AdaLoRA's best (lr {lrs[best - 1]:g}) ends at {means[best]:.4f} ± {stds[best]:.4f} against LoRA's "
                f"{means[0]:.4f} ± {stds[0]:.4f} with the same total rank at the end ({rank} per layer on average; "
                f"AdaLoRA trains {outs[1][0].trainable:,} parameters before pruning). Its update starts at Λ = 0 with "
                f"P, Q ~ N(0, 0.02²), so it needs a larger learning rate than LoRA to move in 16 steps. Claim (better "
                f"at an equal budget): **{'held' if better else 'did not hold'}** at this training budget.")
    return Section(table(RESULT_HEADER, [result_row(g) for g in outs]) + "\n\n" + sentence, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", default="init,adalora")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adalora-lrs", default="1e-3,1e-2,3e-2", help="AdaLoRA learning rates (LoRA: 1e-3)")
    parser.add_argument("--quick", action="store_true", help="3 runs of 3 steps: checks the pipeline, not the claims")
    add_report_options(parser)
    args = parser.parse_args()
    budget = Budget(args.steps, 8, args.steps, 32, 16, train_size=1000)  # claim_finetune.py's budget
    claims = [c.strip() for c in args.claims.split(",")]
    if args.quick:
        budget, args.seeds, claims = Budget(3, 4, 3, 8, 2, train_size=1000), 1, ["adalora"]
    lab = InitLab(budget, args.threads)
    start = time.perf_counter()
    sections = []
    lrs = [float(lr) for lr in args.adalora_lrs.split(",")]
    builders = {"init": ("Claim 7 (LoftQ, PiSSA): QLoRA started from the weight",
                         lambda: claim_init(lab, args.seeds, args.rank)),
                "adalora": ("Claim 8 (AdaLoRA): importance-pruned ranks vs LoRA",
                            lambda: claim_adalora(lab, args.seeds, args.rank, lrs[:1] if args.quick else lrs))}
    for name in claims:
        title, build = builders[name]
        section = build()
        path = save_figure(args, section.plot, f"claim_{name}.png", dpi=110)
        sections.append(f"### {title}\n\n{section.markdown}\n\n![{title}](plots/{path.name})")
    setup = (f"The fine-tuning claims' set-up (SmolLM2-135M-Instruct, built-in date task, {budget.steps} AdamW steps "
             f"of {budget.batch} examples, lr 1e-3, α = 2r, all linear layers, held-out answer loss on "
             f"{budget.n_eval} examples; AdaLoRA also at larger rates); LoftQ with 2 alternations, QPiSSA = exact-SVD PiSSA then NF4 of every "
             f"layer, AdaLoRA pruned from tinit = {budget.steps // 8} to total − tfinal = "
             f"{budget.steps - budget.steps // 4} steps. ± over {args.seeds} seeds. {len(lab.outcomes)} runs, "
             f"{(time.perf_counter() - start) / 60:.1f} min.")
    emit(args, "The papers' claims at small scale: initialisations and AdaLoRA", setup + "\n\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
