"""The fine-tuning papers' claims at small scale: SmolLM2-135M on the built-in date task, CPU, minutes per run.

Every run fine-tunes the built-in model (`smollm2-135m`) on the same training split of the built-in ledger-date task
(`lorakit.training.task.make_builtin_task`) for the same number of optimizer steps at the same batch size, AdamW with linear
warmup and cosine decay, and scores the same held-out examples: token loss on the answers every few steps, and greedy
exact match at the end. Seeds change the adapter initialisation and the data order, not the data.

Claims (each a table, a plot and a one-sentence verdict):
2. LoRA (Hu et al. 2021, arXiv:2106.09685, §7.2, Table 6): a very small rank suffices; adapting more weight types
   at a lower rank beats one type at a higher rank. Ablation r ∈ {1, 2, 4, 8, 16, 64} on q,v and on all linear layers.
3. LoRA+ (Hayou et al. 2024, arXiv:2402.12354, §4): training B with a learning rate λ = 16 times A's reaches a
   given loss in up to 2× fewer steps at the same base learning rate.
4. DoRA (Liu et al. 2024, arXiv:2402.09353, §5.1, §5.5): DoRA beats LoRA at equal rank and stays ahead at half rank.
5. VeRA (Kopiczko et al. 2024, arXiv:2310.11454, §4): close to LoRA with 10×+ fewer trainable parameters.
6. QLoRA (Dettmers et al. 2023, arXiv:2305.14314, §5): LoRA on an NF4 base matches LoRA on the 16/32-bit base, and
   both approach full fine-tuning (the reference line).

    python benchmarks/claim_finetune.py            # all claims, 22 runs, ≈ 22 min on 2 cores
    python benchmarks/claim_finetune.py --quick    # a smoke run: 4 runs of 3 steps, ≈ 1 min
    python benchmarks/claim_finetune.py --claims loraplus,dora --seeds 3
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from report import add_report_options, emit, pyplot, save_figure, table

import lorakit
from lorakit.adapters.loraplus import loraplus_param_groups
from lorakit.models import load_model
from lorakit.training import cosine_with_warmup
from lorakit.training.batches import BatchStream
from lorakit.training.data import Example, collate, tokenize_records
from lorakit.training.evaluate import evaluate_exact_match, evaluate_loss
from lorakit.training.task import make_builtin_task

QV = "q_proj,v_proj"
EXECUTION_ORDER = ("loraplus", "qlora", "dora", "rank", "vera")
ALL = "all-linear"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run; equal Runs are trained once and shared between claims."""

    method: str = "lora"  # lora | dora | vera | full
    r: int = 8
    targets: str = ALL
    nf4: bool = False
    loraplus_ratio: float | None = None
    lr: float = 1e-3
    seed: int = 0
    track: bool = False  # evaluate every eval_every steps (a loss curve), not only at the start and the end

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full fine-tuning"
        name = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA"}[self.method]
        name = ("Q" + name) if self.nf4 else name
        name += "+" if self.loraplus_ratio else ""
        where = "q,v" if self.targets == QV else "all linear"
        return f"{name} r={self.r} {where}"


@dataclass
class Outcome:
    run: Run
    curve: list[tuple[int, float]]  # (step, held-out answer loss), step 0 = before training
    exact_match: float
    trainable: int
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


@dataclass(frozen=True)
class Budget:
    steps: int
    batch: int
    eval_every: int
    n_eval: int
    n_exact: int
    train_size: int


class Lab:
    """Trains Runs on the built-in task with one fixed data split, caching outcomes."""

    def __init__(self, budget: Budget, threads: int, echo: Callable[[str], None] = print) -> None:
        torch.set_num_threads(threads)
        self.budget = budget
        self.echo = echo
        _, self.tokenizer = load_model("smollm2-135m")
        train_records, eval_records = make_builtin_task(0, budget.train_size, max(budget.n_eval, budget.n_exact))
        self.train, _ = tokenize_records(train_records, self.tokenizer, 64)
        self.eval, _ = tokenize_records(eval_records, self.tokenizer, 64)
        self.outcomes: dict[Run, Outcome] = {}
        self.start_loss: dict[bool, float] = {}  # every adapter starts as the identity: one loss per base (NF4 or not)

    def __call__(self, run: Run) -> Outcome:
        tracked = replace(run, track=True)
        if tracked in self.outcomes:  # a run trained with its curve serves a request without one
            return self.outcomes[tracked]
        if run not in self.outcomes:
            self.outcomes[run] = self._train(run)
        return self.outcomes[run]

    def seeds(self, run: Run, at_least: int) -> list[Outcome]:
        """Seeds 0..at_least-1 of `run`, plus any further seeds of it already trained for another claim."""
        for seed in range(at_least):
            self(replace(run, seed=seed))
        key = replace(run, seed=0, track=False)
        found = [o for r, o in self.outcomes.items() if replace(r, seed=0, track=False) == key]
        return sorted(found, key=lambda o: o.run.seed)

    def _model(self, run: Run) -> torch.nn.Module:
        model, _ = load_model("smollm2-135m")
        if run.method == "full":
            return model.requires_grad_(True)
        if run.nf4:
            lorakit.quantize(model)
        targets: str | tuple[str, ...] = ALL if run.targets == ALL else tuple(run.targets.split(","))
        torch.manual_seed(run.seed)
        if run.method == "vera":
            config: lorakit.LoraConfig | lorakit.VeraConfig = lorakit.VeraConfig(
                r=run.r, target_modules=targets, projection_prng_key=run.seed)
        else:
            config = lorakit.LoraConfig(r=run.r, lora_alpha=2 * run.r, target_modules=targets,
                                        use_dora=run.method == "dora")
        return lorakit.adapt(model, config)

    def _train(self, run: Run) -> Outcome:
        budget = self.budget
        model = self._model(run)
        trainable = lorakit.trainable_parameters(model).trainable
        groups = (loraplus_param_groups(model, run.lr, run.loraplus_ratio) if run.loraplus_ratio else
                  [{"params": [p for p in model.parameters() if p.requires_grad]}])
        optimizer = torch.optim.AdamW(groups, lr=run.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(budget.steps // 10, budget.steps))
        stream = BatchStream(self.train, budget.batch, seed=run.seed)
        torch.manual_seed(run.seed)
        if run.method == "full" or run.nf4 not in self.start_loss:
            self.start_loss[run.nf4] = self._eval_loss(model)
        curve = [(0, self.start_loss[run.nf4])]
        start = time.perf_counter()
        model.train()
        for step in range(1, budget.steps + 1):
            batch = collate(next(stream), self.tokenizer.pad_token_id)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if run.track and step % budget.eval_every == 0 or step == budget.steps:
                curve.append((step, self._eval_loss(model)))
        seconds = time.perf_counter() - start
        exact = evaluate_exact_match(model, self.tokenizer, self.eval[: budget.n_exact])["exact_match"]
        outcome = Outcome(run, curve, exact, trainable, seconds)
        self.echo(f"{run.label:<28} seed {run.seed} lr {run.lr:g}: eval loss {curve[0][1]:.3f} -> "
                  f"{outcome.final_loss:.4f}, exact match {100 * exact:.0f}%, {trainable:,} trainable, {seconds:.0f} s")
        return outcome

    def _eval_loss(self, model: torch.nn.Module) -> float:
        examples: Sequence[Example] = self.eval[: self.budget.n_eval]
        return evaluate_loss(model, examples, 32, self.tokenizer.pad_token_id)["eval_loss"]


# -- statistics over seeds ------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values: Sequence[float], digits: int = 4) -> str:
    if not all(map(math.isfinite, values)):  # e.g. steps to a loss one seed never reached
        return ", ".join(f"{v:.{digits}f}" if math.isfinite(v) else "never" for v in values)
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def pct(values: Sequence[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.0f} ± {std:.0f}%" if len(values) > 1 else f"{mean:.0f}%"


RESULT_HEADER = ["run (learning rate)", "trainable", "final eval loss", "exact match"]


def result_row(group: Sequence[Outcome]) -> list[str]:
    """One table row for the seeds of one run: label, trainable parameters, final loss and exact match (± seeds)."""
    run = group[0].run
    return [f"{run.label} ({run.lr:g})", f"{group[0].trainable:,}", pm([o.final_loss for o in group]),
            pct([o.exact_match for o in group])]


def times(ratio: float) -> str:
    return f"{ratio:.2f}×" if math.isfinite(ratio) else "not reached by LoRA" if ratio > 0 else "-"


def clearly_below(a: Sequence[float], b: Sequence[float]) -> bool:
    """a's mean is below b's by more than their seed standard deviations combined (a crude but honest test)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return mb - ma > sa + sb


def steps_to(curve: Sequence[tuple[int, float]], target: float) -> float:
    """First step where the eval-loss curve reaches `target`, interpolated in log-loss between eval points."""
    for (s0, l0), (s1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            if l0 <= target:
                return float(s0)
            frac = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return s0 + frac * (s1 - s0)
    return math.inf


# -- the claims ----------------------------------------------------------------------------------------------------


@dataclass
class Section:
    markdown: str
    plot: Any  # a matplotlib figure


def claim_rank(lab: Lab, ranks: Sequence[int]) -> Section:
    plt = pyplot()

    rows, series, params = [], {}, {}
    for targets in (QV, ALL):
        groups = [lab.seeds(Run(r=r, targets=targets), 1) for r in ranks]  # one seed each; more where already trained
        rows += [result_row(g) for g in groups]
        series[targets] = [[o.final_loss for o in g] for g in groups]
        params[targets] = [g[0].trainable for g in groups]
    fig, ax = plt.subplots(figsize=(6, 4))
    for targets, losses in series.items():
        means = [mean_std(v)[0] for v in losses]
        stds = [mean_std(v)[1] for v in losses]
        ax.errorbar(ranks, means, yerr=stds, marker="o", capsize=3, label="q,v" if targets == QV else "all linear")
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="held-out answer loss",
           title="LoRA rank ablation (SmolLM2-135M, date task)")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.legend()
    loss = {t: [mean_std(v)[0] for v in series[t]] for t in (QV, ALL)}
    # (a) equal budget: all linear at the smallest rank vs q,v at the first rank with at least as many parameters
    k = next((i for i, n in enumerate(params[QV]) if n >= params[ALL][0]), len(ranks) - 1)
    wider = loss[ALL][0] < loss[QV][k]
    # (b) a small rank suffices: the best of r <= 4 against the largest rank, per set of targets
    small = [i for i, r in enumerate(ranks) if r <= 4] or [0]
    ratios = {t: min(loss[t][i] for i in small) / loss[t][-1] for t in (QV, ALL)}
    suffices = all(x <= 1.5 for x in ratios.values())
    repeats = lab.seeds(Run(), 1)
    spread = (f"seed-to-seed spread at r=8: ± {mean_std([o.final_loss for o in repeats])[1]:.4f}"
              if len(repeats) > 1 else "one seed: no spread measured")
    sentence = (f"At a matched budget, all linear layers at r={ranks[0]} ({params[ALL][0]:,} parameters) reach "
                f"{loss[ALL][0]:.4f} against {loss[QV][k]:.4f} for q,v at r={ranks[k]} ({params[QV][k]:,}): claim "
                f"(spreading a small rank over more weight types beats more rank on fewer) **"
                f"{'held' if wider else 'did not hold'}**. The best rank ≤ 4 ends at {ratios[QV]:.2f}× (q,v) and "
                f"{ratios[ALL]:.2f}× (all linear) the loss of r={ranks[-1]} ({spread}): claim (a very small rank "
                f"suffices, within 1.5× here) **{'held' if suffices else 'did not hold'}** at this training budget.")
    md = table(RESULT_HEADER, rows)
    return Section(md + "\n\n" + sentence, fig)


def claim_loraplus(lab: Lab, seeds: int, ratio: float) -> Section:
    plt = pyplot()

    plain = lab.seeds(Run(track=True), seeds)
    plus = lab.seeds(Run(loraplus_ratio=ratio, track=True), seeds)
    start = plain[0].curve[0][1]
    end = max(o.final_loss for o in plain)
    # halfway and three quarters of the way down (in log-loss) to LoRA's final loss (its worst seed), then that loss
    targets = [math.exp(math.log(start) + f * (math.log(end) - math.log(start))) for f in (0.5, 0.75)] + [end]
    rows, speedups = [], []
    for target in targets:
        a = [steps_to(o.curve, target) for o in plain]
        b = [steps_to(o.curve, target) for o in plus]
        ratio_steps = statistics.fmean(a) / statistics.fmean(b)  # inf: LoRA+ reached it, LoRA did not; 0: the reverse
        speedups.append(ratio_steps)
        rows.append([f"{target:.4f}", pm(a, 1), pm(b, 1), times(ratio_steps)])
    rows.append(["final loss", pm([o.final_loss for o in plain]), pm([o.final_loss for o in plus]), ""])
    fig, ax = plt.subplots(figsize=(6, 4))
    for outs, name in ((plain, "LoRA"), (plus, f"LoRA+ (λ={ratio:g})")):
        for i, o in enumerate(outs):
            steps, losses = zip(*o.curve)
            ax.plot(steps, losses, color="C0" if name == "LoRA" else "C1", alpha=0.8, label=name if i == 0 else None)
    for target in targets:
        ax.axhline(target, color="grey", lw=0.6, ls="--")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="held-out answer loss",
           title=f"LoRA+ vs LoRA, r=8 all linear, lr {plain[0].run.lr:g}")
    ax.legend()
    best = max((x for x in speedups if not math.isnan(x)), default=0.0)
    sentence = (f"At the same base learning rate ({plain[0].run.lr:g}), LoRA+ reached the three target losses "
                f"{', '.join(map(times, speedups))} as fast as LoRA (steps of LoRA / steps of LoRA+; "
                f"{seeds} seed{'s' if seeds > 1 else ''} each). Claim (up to 2× faster): **"
                + ("held" if best >= 1.5 else "partly held (faster, but less than 1.5×)" if best > 1.05 else
                   "did not hold") + "** here.")
    md = table(["target eval loss", "LoRA steps", f"LoRA+ (λ={ratio:g}) steps", "speed-up"], rows)
    return Section(md + "\n\n" + sentence, fig)


def claim_dora(lab: Lab, seeds: int, rank: int) -> Section:
    plt = pyplot()

    cases = [Run(r=rank), Run(method="dora", r=rank), Run(r=rank // 2), Run(method="dora", r=rank // 2)]
    outs = [lab.seeds(case, seeds) for case in cases]
    finals = [[o.final_loss for o in group] for group in outs]
    rows = [result_row(g) for g in outs]
    fig, ax = plt.subplots(figsize=(6, 4))
    means, stds = zip(*(mean_std(f) for f in finals))
    ax.bar(range(4), means, yerr=stds, capsize=4, color=["C0", "C1", "C0", "C1"])
    ax.set_xticks(range(4), [g[0].run.label.replace(" all linear", "") for g in outs])
    ax.set(ylabel="held-out answer loss", title="DoRA vs LoRA, all linear layers")
    equal = clearly_below(finals[1], finals[0])
    half = mean_std(finals[3])[0] <= mean_std(finals[0])[0]
    sentence = (f"DoRA r={rank} {'beats' if equal else 'does not clearly beat'} LoRA r={rank} "
                f"({pm(finals[1])} vs {pm(finals[0])}), and DoRA r={rank // 2} "
                f"{'matches or beats' if half else 'falls behind'} LoRA r={rank}. Claim (DoRA better at equal rank, "
                f"robust at half rank): **{'held' if equal and half else 'partly held' if equal or half else 'did not hold'}"
                f"** here" + ("" if equal else "; the difference is within the seed spread") + ".")
    md = table(RESULT_HEADER, rows)
    return Section(md + "\n\n" + sentence, fig)


def claim_vera(lab: Lab, seeds: int, vera_rank: int, vera_lr: float, lora_ranks: Sequence[int]) -> Section:
    plt = pyplot()

    lora = [lab.seeds(Run(r=r), 1) for r in lora_ranks]  # the rank ablation's all-linear runs (more seeds if trained)
    vera = lab.seeds(Run(method="vera", r=vera_rank, lr=vera_lr), seeds)
    rows = [result_row(g) for g in [vera, *lora]]
    fig, ax = plt.subplots(figsize=(6, 4))
    means, stds = zip(*(mean_std([o.final_loss for o in g]) for g in lora))
    ax.errorbar([g[0].trainable for g in lora], means, yerr=stds, marker="o", capsize=3, label="LoRA r=" +
                ",".join(str(r) for r in lora_ranks))
    vera_loss, vera_std = mean_std([o.final_loss for o in vera])
    ax.errorbar([vera[0].trainable], [vera_loss], yerr=[vera_std], marker="s", capsize=3, ls="",
                label=f"VeRA r={vera_rank}")
    ax.set(xscale="log", yscale="log", xlabel="trainable parameters", ylabel="held-out answer loss",
           title="VeRA vs LoRA, all linear layers")
    ax.legend()
    # the smallest LoRA with 10x the parameters (or the largest there is)
    reference = next((g for g in lora if g[0].trainable >= 10 * vera[0].trainable), lora[-1])
    ref_loss = mean_std([o.final_loss for o in reference])[0]
    close = vera_loss <= 1.5 * ref_loss
    sentence = (f"VeRA r={vera_rank} ({vera[0].trainable:,} parameters) ends at {vera_loss:.4f} against {ref_loss:.4f} "
                f"for {reference[0].run.label} ({reference[0].trainable / vera[0].trainable:.0f}× the parameters). "
                f"Claim (close to LoRA, within 1.5× of its loss here, with 10×+ fewer parameters): "
                f"**{'held' if close else 'did not hold'}** at this training budget.")
    md = table(RESULT_HEADER, rows)
    return Section(md + "\n\n" + sentence, fig)


def claim_qlora(lab: Lab, seeds: int, full_lr: float) -> Section:
    plt = pyplot()

    cases = [Run(method="full", lr=full_lr, track=True), Run(track=True), Run(nf4=True, track=True)]
    outs = [lab.seeds(case, seeds) for case in cases]
    finals = [[o.final_loss for o in g] for g in outs]
    rows = [[*result_row(g), f"{statistics.fmean(o.seconds for o in g) / lab.budget.steps:.2f}"] for g in outs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, g in enumerate(outs):
        for j, o in enumerate(g):
            steps, losses = zip(*o.curve)
            ax.plot(steps, losses, color=f"C{i}", alpha=0.8, label=g[0].run.label if j == 0 else None)
    ax.set(yscale="log", xlabel="optimizer step", ylabel="held-out answer loss",
           title="Full fine-tuning, LoRA and QLoRA (NF4 base)")
    ax.legend()
    (mf, _sf), (ml, sl), (mq, sq) = (mean_std(f) for f in finals)
    same = abs(mq - ml) <= max(sl + sq, 0.1 * ml)
    sentence = (f"QLoRA ends at {mq:.4f} against {ml:.4f} for LoRA on the float32 base and {mf:.4f} for full "
                f"fine-tuning. Claim (NF4 base loses nothing; LoRA approaches full fine-tuning): "
                f"**{'held' if same else 'did not hold'}** for QLoRA vs LoRA"
                f"{' (within the seed spread or 10%)' if same else ''}; LoRA's final loss is "
                f"{ml / mf:.2f}× full fine-tuning's.")
    md = table([*RESULT_HEADER, "s/step"], rows)
    return Section(md + "\n\n" + sentence, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", default="rank,loraplus,dora,vera,qlora")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ranks", default="1,2,4,8,16,64", help="LoRA ranks of the ablation (claim 2)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--n-eval", type=int, default=32, help="held-out examples for the eval loss")
    parser.add_argument("--n-exact", type=int, default=16, help="held-out examples scored by exact match at the end")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vera-lr", type=float, default=3e-2)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--quick", action="store_true", help="4 runs of 3 steps: checks the pipeline, not the claims")
    add_report_options(parser)
    args = parser.parse_args()
    claims = [c.strip() for c in args.claims.split(",")]
    ranks = tuple(int(r) for r in args.ranks.split(","))
    if args.quick:
        args.steps, args.seeds, args.eval_every, args.n_eval, args.n_exact, args.batch = 3, 1, 1, 8, 2, 4
        claims, ranks = ["rank", "loraplus"], (1,)
    budget = Budget(args.steps, args.batch, args.eval_every, args.n_eval, args.n_exact, train_size=1000)
    lab = Lab(budget, args.threads)
    builders: dict[str, tuple[str, Callable[[], Section]]] = {  # in the order of the report
        "rank": ("Claim 2 (LoRA): rank ablation, q,v vs all linear layers", lambda: claim_rank(lab, ranks)),
        "loraplus": ("Claim 3 (LoRA+): steps to a target loss", lambda: claim_loraplus(lab, args.seeds, 16.0)),
        "dora": ("Claim 4 (DoRA): DoRA vs LoRA at equal and half rank", lambda: claim_dora(lab, args.seeds, 8)),
        "vera": ("Claim 5 (VeRA): quality against trainable parameters",
                 lambda: claim_vera(lab, args.seeds, 256, args.vera_lr, ranks)),
        "qlora": ("Claim 6 (QLoRA, full fine-tuning): quality of each", lambda: claim_qlora(lab, 1, args.full_lr)),
    }
    unknown = [c for c in claims if c not in builders]
    if unknown:
        parser.error(f"unknown claim(s) {', '.join(unknown)}; choose from {', '.join(builders)}")
    start = time.perf_counter()
    built: dict[str, str] = {}
    for name in sorted(claims, key=EXECUTION_ORDER.index):  # runs with loss curves first, so others reuse them
        title, build = builders[name]
        try:
            section = build()
        except Exception as error:  # noqa: BLE001 (one claim's failure must not discard the others' runs)
            built[name] = f"### {title}\n\n**Failed**: `{type(error).__name__}: {error}`"
            traceback.print_exc()
            continue
        path = save_figure(args, section.plot, f"claim_{name}.png", dpi=110)
        built[name] = f"### {title}\n\n{section.markdown}\n\n![{title}](plots/{path.name})"
    setup = (f"SmolLM2-135M-Instruct (float32), built-in date task: {budget.train_size} training examples, "
             f"{args.steps} AdamW steps of {args.batch} examples (warmup {args.steps // 10}, cosine), gradient "
             f"clipping 1.0, α = 2r; held-out answer loss on {args.n_eval} examples at the end (and every "
             f"{args.eval_every} steps where a curve is drawn), greedy exact match on {args.n_exact} at the end; "
             f"learning rate 1e-3 for LoRA/DoRA/QLoRA, {args.vera_lr:g} for VeRA (its vectors need a larger rate, as "
             f"in the paper), {args.full_lr:g} for full fine-tuning. ± is the standard deviation over seeds (adapter "
             f"init and data order). {len(lab.outcomes)} runs, {(time.perf_counter() - start) / 60:.1f} min.")
    body = "\n\n".join(built[name] for name in builders if name in built)
    emit(args, "The papers' claims at small scale: fine-tuning", setup + "\n\n" + body)
    if any("**Failed**" in text for text in built.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
