"""Ablations: PILOT retrained once per variant (a component or loss term switched), side by side.

Each variant lays its settings over the configured guidance site and stage-1 loop
(:class:`pilot.config.AblationVariant`), trains stage 1 on the same cached trajectories (a
variant at another injection layer gets its own cache, as in ``tune``), refines with stage 2
unless switched off, and answers both test splits through the shared generation-and-scoring
path. Variants that change only stage 2 (``no_stage2``, ``latent_policy``) share one stage-1
training: it is the same run from the same seed, so it is trained once. The report puts each
variant beside the run's zero-shot and plan-in-context rows, so gap recovered is measured against
the same references as the results table.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from pilot.config import (
    AblationsParams,
    AblationVariant,
    GenerationParams,
    GuidanceParams,
    LatentsParams,
    Stage1Config,
    Stage2Config,
)
from pilot.evaluation import answer_and_score
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.latents import LatentCache
from pilot.models import CausalLM, count_parameters
from pilot.statistics import paired_difference, summarize
from pilot.training.stage1 import run_stage1
from pilot.training.stage2 import run_stage2
from pilot.tuning import site_cache

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("zero_shot", "plan_in_context")


@dataclass
class AblationResult:
    name: str
    variant: AblationVariant
    predictions: pd.DataFrame
    hypernet: HyperNetwork
    stage1_seconds: float
    stage2_seconds: float
    stage1_best_step: int
    stage2_best_step: int | None
    val_accuracy: float          # the returned hyper-network's validation accuracy: what selected it
    stage1_from: str = ""        # the earlier variant whose stage 1 this one reused ("": trained its own)

    def describe(self) -> str:
        """The variant's settings in one line ("as configured" for none)."""
        parts = [f"guidance.{k}={v}" for k, v in self.variant.guidance.items()]
        parts += [f"stage1.{k}={v}" for k, v in self.variant.stage1.items()]
        if self.variant.stage2 is False:
            parts.append("no stage 2")
        elif isinstance(self.variant.stage2, dict):
            parts += [f"stage2.{k}={v}" for k, v in self.variant.stage2.items()]
        described = ", ".join(parts) or "as configured"
        return f"{described} (stage 1 of {self.stage1_from})" if self.stage1_from else described


def run_variant(name: str, variant: AblationVariant, student: CausalLM, cache: LatentCache,
                teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame, tasks_val: pd.DataFrame,
                tasks_test: pd.DataFrame, guidance: GuidanceParams, latents: LatentsParams, stage1: Stage1Config,
                stage2: Stage2Config, generation: GenerationParams, config: AblationsParams,
                cache_dir: str, stage1_runs: dict[str, tuple[str, object]] | None = None) -> AblationResult:
    """Train and evaluate one variant; its predictions carry ``method = name``.

    ``stage1_runs`` (filled here) maps a variant's stage-1 settings to the first variant that trained
    them and its result, so a later variant with the same settings reuses it (stage 2 refines a copy).
    """
    variant_guidance = guidance.model_copy(update=variant.guidance)
    variant_guidance.check_against(student.num_layers)
    training = stage1.model_copy(update={**variant.stage1, "checkpoint_every": 0,
                                         **({"steps": config.stage1_steps} if config.stage1_steps else {})})
    logger.info("Ablation '%s': %s", name, variant.model_dump())
    key = json.dumps([variant_guidance.model_dump(), training.model_dump()], sort_keys=True, default=str)
    stage1_from, first = (stage1_runs or {}).get(key, ("", None))
    if first is None:
        trial_cache = site_cache(student, cache, teacher_plans, tasks_train, variant_guidance, guidance, latents,
                                 cache_dir)
        first = run_stage1(student, trial_cache, teacher_plans, tasks_train, tasks_val, variant_guidance, latents,
                           training, generation)
        if stage1_runs is not None:
            stage1_runs[key] = (name, first)
    else:
        logger.info("Ablation '%s' reuses the stage 1 of '%s' (the same settings and seed).", name, stage1_from)
    hypernet, stage2_seconds, stage2_best, val_accuracy = first.model, 0.0, None, first.best_val_accuracy
    if variant.stage2 is not False:
        overrides = variant.stage2 if isinstance(variant.stage2, dict) else {}
        refine = stage2.model_copy(update={**overrides, "checkpoint_every": 0,
                                           **({"steps": config.stage2_steps} if config.stage2_steps else {})})
        second = run_stage2(student, first.model, tasks_train, tasks_val, refine, generation)
        hypernet, stage2_seconds, stage2_best = second.model, second.seconds, second.best_step
        val_accuracy = second.best_val_accuracy
    with GuidedStudent(student, hypernet.eval().to(student.device)) as guided:
        predictions = answer_and_score(student, tasks_test, guidance=guided.guidance(), generation=generation,
                                       method=name, progress=f"ablation {name}")
    hypernet.cpu()
    return AblationResult(name, variant, predictions, hypernet, first.seconds, stage2_seconds, first.best_step,
                          stage2_best, val_accuracy, stage1_from)


def _paired_against(results: list[AblationResult], reference: AblationResult, split: str) -> dict[str, dict]:
    """Each variant's accuracy minus the reference variant's on the same ``split`` questions
    (paired bootstrap interval, McNemar's exact p)."""
    def correct(result: AblationResult) -> pd.Series:
        part = result.predictions[result.predictions["split"] == split] if "split" in result.predictions \
            else result.predictions
        return part.set_index("id")["correct"].astype(float)

    base, found = correct(reference), {}
    for result in results:
        if result is reference:
            continue
        mine = correct(result)
        shared = base.index.intersection(mine.index)
        if len(shared):
            found[result.name] = paired_difference(base[shared].to_numpy(), mine[shared].to_numpy())
    return found


def ablation_table(results: list[AblationResult], references: pd.DataFrame,
                   reference_variant: str = "reference") -> pd.DataFrame:
    """One row per variant: accuracy with its 95 % interval and gap recovered (with its interval;
    NaN where the plan gap is not clear of zero) on each test split, the paired difference to the
    ``reference_variant`` (the configured PILOT; the first variant if none has that name) with its
    interval and McNemar's p, hyper-network parameters and training time."""
    missing = set(REFERENCE_METHODS) - set(references["method"])
    if missing:
        raise ValueError(f"The ablation report needs the evaluation's {sorted(missing)} predictions; "
                         "run `kedro run --pipelines evaluation` first.")
    summary = summarize(pd.concat([references[references["method"].isin(REFERENCE_METHODS)],
                                   *(r.predictions for r in results)], ignore_index=True))
    overall = summary[summary["task"] == "overall"].set_index(["split", "method"])
    reference = next((r for r in results if r.name == reference_variant), results[0] if results else None)
    paired = {split: _paired_against(results, reference, split) if reference is not None else {}
              for split in ("test", "test_ood")}
    rows = []
    for method in [*REFERENCE_METHODS, *(r.name for r in results)]:
        result = next((r for r in results if r.name == method), None)
        row = {"variant": method, "settings": result.describe() if result else "reference (evaluation pipeline)"}
        for split, prefix in (("test", ""), ("test_ood", "ood_")):
            if (split, method) in overall.index:
                found = overall.loc[(split, method)]
                row.update({f"{prefix}accuracy": found["accuracy"], f"{prefix}ci_low": found["ci_low"],
                            f"{prefix}ci_high": found["ci_high"], f"{prefix}gap_recovered": found["gap_recovered"],
                            f"{prefix}gap_recovered_low": found["gap_recovered_low"],
                            f"{prefix}gap_recovered_high": found["gap_recovered_high"]})
            if method in paired[split]:
                diff = paired[split][method]
                row.update({f"{prefix}vs_reference": diff["difference"], f"{prefix}vs_reference_low": diff["ci_low"],
                            f"{prefix}vs_reference_high": diff["ci_high"], f"{prefix}vs_reference_p": diff["p_value"]})
        if result is not None:
            row.update(val_accuracy=result.val_accuracy, hypernet_parameters=count_parameters(result.hypernet),
                       train_seconds=result.stage1_seconds + result.stage2_seconds,
                       stage1_best_step=result.stage1_best_step,
                       stage2_best_step=-1 if result.stage2_best_step is None else result.stage2_best_step)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["reference_variant"] = reference.name if reference is not None else ""
    return table


def ablation_markdown(table: pd.DataFrame) -> str:
    def cell(row: pd.Series, prefix: str) -> str:
        if pd.isna(row.get(f"{prefix}accuracy")):
            return ""
        return f"{row[f'{prefix}accuracy']:.3f} [{row[f'{prefix}ci_low']:.3f}, {row[f'{prefix}ci_high']:.3f}]"

    def gap(row: pd.Series, prefix: str) -> str:
        if pd.isna(row.get(f"{prefix}accuracy")):
            return ""
        value = row.get(f"{prefix}gap_recovered")
        if pd.isna(value):
            return "undefined"
        return f"{value:.3f} [{row[f'{prefix}gap_recovered_low']:.3f}, {row[f'{prefix}gap_recovered_high']:.3f}]"

    def versus(row: pd.Series, prefix: str) -> str:
        value = row.get(f"{prefix}vs_reference")
        if value is None or pd.isna(value):
            return ""
        return (f"{value:+.3f} [{row[f'{prefix}vs_reference_low']:+.3f}, {row[f'{prefix}vs_reference_high']:+.3f}] "
                f"p={row[f'{prefix}vs_reference_p']:.3g}")

    def number(value: object, spec: str) -> str:
        return "" if pd.isna(value) else format(value, spec)

    reference = table.attrs.get("reference_variant") or "reference"
    lines = ["# PILOT ablations", "",
             "Each variant retrains PILOT with one setting changed (stage 1, then stage 2 unless switched off), "
             "selected on validation like the main run (its validation accuracy is what a configuration is chosen "
             "on; the test columns are not), and answers the same test questions. Accuracy with 95 % "
             "Wilson intervals; gap recovered against the evaluation's zero-shot and plan-in-context rows of the "
             "same split, with its paired-bootstrap interval, \"undefined\" where the plan gap's own paired "
             f"interval does not exclude zero. \"vs {reference}\": the variant's accuracy minus the `{reference}` "
             "variant's on the same questions, its 95 % paired-bootstrap interval and McNemar's exact p-value "
             "(`no_stage2`'s row is minus the effect of stage 2).", "",
             f"| variant | settings | val accuracy (selection) | test accuracy | vs {reference} (test) | gap recovered | "
             f"OOD accuracy | vs {reference} (OOD) | OOD gap recovered | hyper-network params | train s | "
             "best steps (s1 / s2) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        steps = "" if pd.isna(row.get("stage1_best_step")) else \
            f"{int(row['stage1_best_step'])} / {'-' if row['stage2_best_step'] < 0 else int(row['stage2_best_step'])}"
        lines.append(f"| {row['variant']} | {row['settings']} | {number(row.get('val_accuracy'), '.3f')} | "
                     f"{cell(row, '')} | {versus(row, '')} | {gap(row, '')} | {cell(row, 'ood_')} | "
                     f"{versus(row, 'ood_')} | {gap(row, 'ood_')} | "
                     f"{number(row.get('hypernet_parameters'), ',.0f')} | {number(row.get('train_seconds'), '.0f')} | "
                     f"{steps} |")
    return "\n".join(lines) + "\n"


def run_ablations(config: AblationsParams, train: Callable[[str, AblationVariant], AblationResult],
                  on_result: Callable[[AblationResult], None] | None = None) -> list[AblationResult]:
    """Every variant in order, each handed to ``on_result`` as it finishes (an MLflow run, say)."""
    results = []
    for number, variant in enumerate(config.variants, start=1):
        name = variant.name
        began = time.perf_counter()
        result = train(name, variant)
        logger.info("Ablation %d/%d '%s' done in %.0fs: test accuracy %.3f", number, len(config.variants), name,
                    time.perf_counter() - began, result.predictions.query("split == 'test'")["correct"].mean())
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
