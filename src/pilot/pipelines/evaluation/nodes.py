"""Nodes of the ``evaluation`` pipeline: every method on the same test split, then the report.

Each method is one node answering through the shared generation-and-scoring path
(:func:`pilot.evaluation.answer_and_score`) with the same decoding settings.
"""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import pandas as pd
import torch

from pilot import plots, tracking
from pilot.baselines.caa import steered
from pilot.baselines.lora import LoraAdapter
from pilot.baselines.modules import TrainedModule
from pilot.baselines.reft import Reft
from pilot.baselines.soft_prompts import AttachedSoftPrompt
from pilot.config import (
    BaselinesParams,
    EvaluationParams,
    GenerationParams,
    GuidanceParams,
    LatentsParams,
    Stage1Params,
    Stage2Params,
)
from pilot.evaluation import answer_and_score, method_settings, summarize
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.latency import latency_table, measure_latency, method_answerers
from pilot.latents import select_examples
from pilot.models import CausalLM, count_parameters
from pilot.serving import log_pilot_model

logger = logging.getLogger(__name__)


def _answer(student: CausalLM, tasks_test: pd.DataFrame, generation: GenerationParams, method: str,
            **kwargs) -> pd.DataFrame:
    predictions = answer_and_score(student, tasks_test, max_new_tokens=generation.max_new_tokens,
                                   batch_size=generation.batch_size, stop_strings=generation.stop, method=method,
                                   progress=method, **kwargs)
    logger.info("%s: test accuracy %.3f", method, predictions["correct"].mean())
    return predictions


def _plans_for(rows: pd.DataFrame, teacher_plans: pd.DataFrame) -> pd.DataFrame:
    """The teacher's plan and plan-writing time for each of ``rows``, in their order."""
    plans = rows[["id"]].merge(teacher_plans[["id", "plan", "teacher_seconds"]], on="id", how="left")
    if plans["plan"].isna().any():
        raise ValueError("Some test queries have no teacher plan; rerun `kedro run --pipelines plans`.")
    return plans


def evaluate_zero_shot(student: CausalLM, tasks_test: pd.DataFrame, generation: GenerationParams) -> pd.DataFrame:
    """The frozen student alone."""
    return _answer(student, tasks_test, generation, "zero_shot")


def evaluate_plan_in_context(student: CausalLM, tasks_test: pd.DataFrame, teacher_plans: pd.DataFrame,
                             generation: GenerationParams) -> pd.DataFrame:
    """The student with the teacher's plan for each test query; latency includes the teacher's."""
    plans = _plans_for(tasks_test, teacher_plans)
    return _answer(student, tasks_test, generation, "plan_in_context", plans=plans["plan"].tolist(),
                   extra_seconds=plans["teacher_seconds"].tolist())


def evaluate_lora(student: CausalLM, lora_adapter: LoraAdapter, tasks_test: pd.DataFrame,
                  generation: GenerationParams) -> pd.DataFrame:
    """The student with the LoRA adapter attached (a copy; the student itself stays frozen)."""
    return _answer(lora_adapter.attach(student), tasks_test, generation, "lora")


def evaluate_reft(student: CausalLM, reft_interventions: Reft, tasks_test: pd.DataFrame,
                  generation: GenerationParams) -> pd.DataFrame:
    """The student with the LoReFT interventions hooked on its layers."""
    reft = reft_interventions.to(student.device)
    with reft.attached(student), reft.frozen_weights():
        return _answer(student, tasks_test, generation, "reft")


def _evaluate_soft_prompt(student: CausalLM, module: TrainedModule, tasks_test: pd.DataFrame,
                          generation: GenerationParams, assistant: CausalLM | None = None) -> pd.DataFrame:
    with AttachedSoftPrompt(module.to(student.device), student, assistant) as soft:
        return _answer(student, tasks_test, generation, module.kind, soft_prompt=soft)


def evaluate_pause_tokens(student: CausalLM, pause_tokens: TrainedModule, tasks_test: pd.DataFrame,
                          generation: GenerationParams) -> pd.DataFrame:
    """The student with the learned pause tokens after every prompt."""
    return _evaluate_soft_prompt(student, pause_tokens, tasks_test, generation)


def evaluate_soft_thoughts(student: CausalLM, teacher_model: CausalLM, soft_thoughts: TrainedModule,
                           tasks_test: pd.DataFrame, generation: GenerationParams) -> pd.DataFrame:
    """The student with soft thoughts: the teacher reads each prompt at run time (its time is in the latency)."""
    return _evaluate_soft_prompt(student, soft_thoughts, tasks_test, generation, assistant=teacher_model)


def evaluate_caa(student: CausalLM, steering_vector: dict[str, torch.Tensor], caa_config: dict,
                 tasks_test: pd.DataFrame, guidance: GuidanceParams, generation: GenerationParams) -> pd.DataFrame:
    """The static steering vector at the injection layer, at its validation-chosen scale."""
    with steered(student, steering_vector, guidance.inject_layer, caa_config["scale"], len(tasks_test)) as steering:
        return _answer(student, tasks_test, generation, "caa", guidance=steering)


def _evaluate_pilot(student: CausalLM, hypernet: HyperNetwork, tasks_test: pd.DataFrame,
                    generation: GenerationParams, method: str) -> pd.DataFrame:
    hypernet.config.check_fits(student.hidden_size, student.num_layers, where=f"for {method}")
    with GuidedStudent(student, hypernet.eval().to(student.device)) as guided:
        return _answer(student, tasks_test, generation, method, guidance=guided.guidance())


def evaluate_pilot_stage1(student: CausalLM, hypernet_stage1: HyperNetwork, tasks_test: pd.DataFrame,
                          generation: GenerationParams) -> pd.DataFrame:
    """PILOT after stage 1: the hyper-network's guidance, no plan, no teacher."""
    return _evaluate_pilot(student, hypernet_stage1, tasks_test, generation, "pilot_stage1")


def evaluate_pilot_stage2(student: CausalLM, hypernet_stage2: HyperNetwork, tasks_test: pd.DataFrame,
                          generation: GenerationParams) -> pd.DataFrame:
    """PILOT after stage 2."""
    return _evaluate_pilot(student, hypernet_stage2, tasks_test, generation, "pilot_stage2")


def measure_method_latency(student: CausalLM, teacher_model: CausalLM, tasks_test: pd.DataFrame,
                           teacher_plans: pd.DataFrame, lora_adapter: LoraAdapter, reft_interventions: Reft,
                           steering_vector: dict[str, torch.Tensor], caa_config: dict, pause_tokens: TrainedModule,
                           soft_thoughts: TrainedModule, hypernet_stage1: HyperNetwork, hypernet_stage2: HyperNetwork,
                           guidance: GuidanceParams, generation: GenerationParams,
                           evaluation: EvaluationParams) -> pd.DataFrame:
    """Every method's latency on the same questions, one at a time, warmed up and interleaved.

    Returns:
        ``latency_table``: median ms per query per (method, task) and overall.
    """
    settings = evaluation.latency
    in_distribution = tasks_test[tasks_test["split"] == "test"] if "split" in tasks_test else tasks_test
    timed = in_distribution.groupby("task", sort=True).head(settings.questions_per_task).reset_index(drop=True)
    plans = _plans_for(timed, teacher_plans)
    answerers = method_answerers(
        student, timed["question"].tolist(), generation.max_new_tokens, plans=plans["plan"].tolist(),
        teacher_seconds=plans["teacher_seconds"].tolist(), lora_adapter=lora_adapter, reft=reft_interventions,
        steering_vector=steering_vector, caa_scale=caa_config["scale"], inject_layer=guidance.inject_layer,
        soft_prompts={"pause_tokens": pause_tokens, "soft_thoughts": soft_thoughts}, assistant=teacher_model,
        hypernets={"pilot_stage1": hypernet_stage1, "pilot_stage2": hypernet_stage2}, stop_strings=generation.stop)
    timings = measure_latency(answerers, len(timed), settings.passes, settings.warmup_questions, progress=True)
    table = latency_table(timings, timed["task"].tolist())
    overall = table[table["task"] == "overall"].set_index("method")["median_ms_per_query"]
    logger.info("Latency (median ms per query, %d questions x %d passes): %s", len(timed), settings.passes,
                ", ".join(f"{m} {v:.2f}" for m, v in overall.items()))
    return table


def build_report(latency: pd.DataFrame, *method_predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str, dict]:
    """All predictions, the results table (parquet + markdown) and overall metrics.

    Accuracy comes from the predictions; latency from ``latency`` (:func:`measure_method_latency`).

    Returns:
        ``predictions``, ``results_table``, ``results_markdown``, ``results_metrics``.
    """
    predictions = pd.concat(method_predictions, ignore_index=True)
    table = summarize(predictions, latency=latency)
    shown = table.copy()
    for column in ("accuracy", "ci_low", "ci_high"):
        shown[column] = shown[column].map(lambda v: f"{v:.3f}")
    shown["gap_recovered"] = [
        "undefined" if pd.isna(v) else f"{v:.3f} [{low:.3f}, {high:.3f}]"
        for v, low, high in zip(table["gap_recovered"], table["gap_recovered_low"], table["gap_recovered_high"])]
    shown["paired_difference"] = [
        "" if pd.isna(v) else f"{v:+.3f} [{low:+.3f}, {high:+.3f}] vs {against}, McNemar p={p:.3g}"
        for v, low, high, against, p in zip(table["paired_difference"], table["paired_ci_low"],
                                            table["paired_ci_high"], table["paired_against"],
                                            table["paired_p_value"])]
    shown = shown.drop(columns=["gap_recovered_low", "gap_recovered_high", "paired_against", "paired_ci_low",
                                "paired_ci_high", "paired_p_value"])
    shown["median_ms_per_query"] = shown["median_ms_per_query"].map(lambda v: f"{v:.2f}")
    shown["mean_new_tokens"] = shown["mean_new_tokens"].map(lambda v: f"{v:.1f}")
    sections = {"test": "Test split (in distribution)",
                "test_ood": "Out-of-distribution test split (the same generators, harder settings: `ood_kwargs`)"}
    markdown = "# PILOT evaluation\n\n" + "".join(
        f"## {sections.get(split, split)}\n\n" + part.drop(columns="split").to_markdown(index=False) + "\n\n"
        for split, part in shown.groupby("split", sort=True))
    markdown += ("Latency: `median_ms_per_query` is timed apart from accuracy, on the first "
                "`evaluation.latency.questions_per_task` test questions of each task (`timed_queries` per row): "
                "each method answers them one at a time (batch of 1) after a shared warm-up, interleaved "
                "round-robin with the other methods over `evaluation.latency.passes` passes; the median over "
                "passes, then over questions. `plan_in_context` includes the teacher's recorded plan-writing "
                "time per query.\n\n"
                "Gap recovered = (acc - acc_zero_shot) / (acc_plan_in_context - acc_zero_shot), with its 95 % "
                "paired-bootstrap interval (questions resampled, every method on the same draws); \"undefined\" "
                "where the plan gap's own paired interval does not exclude zero. `paired_difference`: PILOT "
                "stage 2 minus stage 1 on the same questions, its 95 % paired-bootstrap interval and McNemar's "
                "exact p-value.\n")
    overall = table[table["task"] == "overall"]
    prefix = {"test": "", "test_ood": "ood_"}
    metrics = {f"{row['method']}_{prefix.get(row['split'], row['split'] + '_')}{name}": row[name]
               for _, row in overall.iterrows()
               for name in ("accuracy", "gap_recovered", "gap_recovered_low", "gap_recovered_high",
                            "paired_difference", "paired_ci_low", "paired_ci_high", "paired_p_value")
               if pd.notna(row[name])}
    return predictions, table, markdown, tracking.metric_records(metrics)


def plot_results(results_table: pd.DataFrame) -> tuple[plt.Figure, plt.Figure]:
    """Accuracy by method and task (95 % intervals), and latency by method."""
    return plots.accuracy_by_method(results_table), plots.latency_by_method(results_table)


def plot_training(stage1_history: pd.DataFrame, stage1_validation: pd.DataFrame, stage2_history: pd.DataFrame,
                  stage2_validation: pd.DataFrame) -> plt.Figure:
    """Stage-1 losses, stage-2 reward and both stages' validation accuracy."""
    return plots.training_curves(stage1_history, stage1_validation, stage2_history, stage2_validation)


def describe_methods(hypernet_stage1: HyperNetwork, hypernet_stage2: HyperNetwork, lora_adapter: LoraAdapter,
                     reft_interventions: Reft, pause_tokens: TrainedModule, soft_thoughts: TrainedModule,
                     caa_config: dict, steering_vector: dict[str, torch.Tensor], teacher_plans: pd.DataFrame,
                     tasks_train: pd.DataFrame, tasks_val: pd.DataFrame, guidance: GuidanceParams,
                     latents: LatentsParams, stage1: Stage1Params, stage2: Stage2Params,
                     baselines: BaselinesParams, seed: int) -> dict[str, dict[str, str]]:
    """What each method is, under the same keys for every method (``pilot.evaluation.METHOD_SETTINGS``).

    Training steps are the configured optimizer steps behind the method (PILOT stage 2: stage 1's
    plus its own); training data rows are the rows it learned from (stage 1 and CAA: the kept
    teacher plans in the latent cache; LoRA, ReFT, pause tokens, soft thoughts and stage 2: the
    training split).

    Returns:
        ``method_settings``: ``{method: {setting: value as text, "" where it does not apply}}``.
    """
    cached = len(select_examples(teacher_plans, pd.concat([tasks_train, tasks_val]), latents.splits))

    def trained(module, training) -> dict:   # the adapter baselines: LoRA's protocol
        return {"trainable_parameters": module.num_parameters, "training_steps": training.steps or stage1.training.steps,
                "training_data_rows": len(tasks_train)}

    def pilot(hypernet: HyperNetwork, steps: int, rows: int) -> dict:
        site = hypernet.config
        return {"trainable_parameters": count_parameters(hypernet), "guidance_reader": site.reader,
                "guidance_read_layer": site.resolved_read_layer(), "guidance_inject_layer": site.inject_layer,
                "guidance_scale": site.guidance_scale, "training_steps": steps, "training_data_rows": rows}

    settings = {
        "zero_shot": {"trainable_parameters": 0},
        "plan_in_context": {"trainable_parameters": 0},
        "lora": trained(lora_adapter, baselines.lora.training),
        "reft": {**trained(reft_interventions, baselines.reft.training),
                 "guidance_inject_layer": ",".join(map(str, reft_interventions.layers))},
        "pause_tokens": trained(pause_tokens, baselines.pause_tokens.training),
        "soft_thoughts": trained(soft_thoughts, baselines.soft_thoughts.training),
        "caa": {"trainable_parameters": int(steering_vector["vector"].numel()),
                "guidance_inject_layer": guidance.inject_layer, "guidance_scale": caa_config["scale"],
                "training_data_rows": cached},
        "pilot_stage1": pilot(hypernet_stage1, stage1.training.steps, cached),
        "pilot_stage2": pilot(hypernet_stage2, stage1.training.steps + stage2.training.steps, len(tasks_train)),
    }
    return {method: method_settings(method, seed=seed, **values) for method, values in settings.items()}


def log_method_runs(results_table: pd.DataFrame, method_settings: dict[str, dict[str, str]]) -> dict:
    """One nested MLflow run per method, for the compare view: the same metric names, and the same
    parameter and tag keys (``method_settings``) for every method.

    Runs after the results table is saved, so a tracking failure cannot lose results.

    Returns:
        ``{method: run_id}`` (empty with tracking off).
    """
    run_ids = {}
    for method, part in results_table.groupby("method", sort=False):
        settings = method_settings.get(method) or {"method": method}
        with tracking.nested_run(f"eval-{method}", tags=settings) as run_id:
            if run_id is None:
                continue
            tracking.log_params(settings)
            metrics = {}
            for row in part.itertuples():
                if row.split != "test":  # the out-of-distribution split: its own metric names
                    metrics[f"{row.split}_accuracy_{row.task}"] = row.accuracy
                    continue
                metrics[f"accuracy_{row.task}"] = row.accuracy
                if row.task == "overall":
                    metrics.update(accuracy=row.accuracy, ci_low=row.ci_low, ci_high=row.ci_high,
                                   median_ms_per_query=row.median_ms_per_query, mean_new_tokens=row.mean_new_tokens)
                    metrics.update({name: getattr(row, name) for name in (
                        "gap_recovered", "gap_recovered_low", "gap_recovered_high", "paired_difference",
                        "paired_ci_low", "paired_ci_high", "paired_p_value") if pd.notna(getattr(row, name))})
            tracking.log_metrics(metrics)
            run_ids[method] = run_id
    return run_ids


def log_trained_model(student: CausalLM, hypernet_stage2: HyperNetwork, generation: GenerationParams,
                      evaluation: EvaluationParams) -> dict:
    """The trained PILOT (student + stage-2 hyper-network) as an MLflow pyfunc model, registered
    under ``evaluation.registered_model_name``; load it with ``mlflow.pyfunc.load_model``.

    Returns:
        ``trained_model``: its run id, model URI and registered name and version (empty with tracking off).
    """
    info = log_pilot_model(student, hypernet_stage2, max_new_tokens=generation.max_new_tokens,
                           batch_size=generation.batch_size, name=evaluation.model_name,
                           registered_model_name=evaluation.registered_model_name)
    if info:
        logger.info("Trained PILOT logged as %s (registered: %s %s)", info["model_uri"],
                    info["registered_model_name"] or "no", info["registered_model_version"])
    return info
