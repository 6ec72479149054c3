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
from pilot.config import GenerationParams, GuidanceParams
from pilot.evaluation import answer_and_score, summarize
from pilot.guidance import GuidedStudent, HyperNetwork
from pilot.models import CausalLM

logger = logging.getLogger(__name__)


def _answer(student: CausalLM, tasks_test: pd.DataFrame, generation: GenerationParams, method: str,
            **kwargs) -> pd.DataFrame:
    predictions = answer_and_score(student, tasks_test, max_new_tokens=generation.max_new_tokens,
                                   batch_size=generation.batch_size, method=method, progress=method, **kwargs)
    logger.info("%s: test accuracy %.3f", method, predictions["correct"].mean())
    return predictions


def evaluate_zero_shot(student: CausalLM, tasks_test: pd.DataFrame, generation: GenerationParams) -> pd.DataFrame:
    """The frozen student alone."""
    return _answer(student, tasks_test, generation, "zero_shot")


def evaluate_plan_in_context(student: CausalLM, tasks_test: pd.DataFrame, teacher_plans: pd.DataFrame,
                             generation: GenerationParams) -> pd.DataFrame:
    """The student with the teacher's plan for each test query; latency includes the teacher's."""
    plans = tasks_test[["id"]].merge(teacher_plans[["id", "plan", "teacher_seconds"]], on="id", how="left")
    if plans["plan"].isna().any():
        raise ValueError("Some test queries have no teacher plan; rerun `kedro run --pipelines plans`.")
    return _answer(student, tasks_test, generation, "plan_in_context", plans=plans["plan"].tolist(),
                   extra_seconds=plans["teacher_seconds"].tolist())


def evaluate_lora(student: CausalLM, lora_adapter: LoraAdapter, tasks_test: pd.DataFrame,
                  generation: GenerationParams) -> pd.DataFrame:
    """The student with the LoRA adapter attached (a copy; the student itself stays frozen)."""
    return _answer(lora_adapter.attach(student), tasks_test, generation, "lora")


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


def build_report(*method_predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str, dict]:
    """All predictions, the results table (parquet + markdown) and overall metrics.

    Returns:
        ``predictions``, ``results_table``, ``results_markdown``, ``results_metrics``.
    """
    predictions = pd.concat(method_predictions, ignore_index=True)
    table = summarize(predictions)
    shown = table.copy()
    for column in ("accuracy", "ci_low", "ci_high", "gap_recovered"):
        shown[column] = shown[column].map(lambda v: f"{v:.3f}")
    shown["median_ms_per_query"] = shown["median_ms_per_query"].map(lambda v: f"{v:.2f}")
    shown["mean_new_tokens"] = shown["mean_new_tokens"].map(lambda v: f"{v:.1f}")
    markdown = "# PILOT evaluation (test split)\n\n" + shown.to_markdown(index=False) + "\n"
    overall = table[table["task"] == "overall"].set_index("method")
    metrics = {f"{method}_{name}": row[name] for method, row in overall.iterrows()
               for name in ("accuracy", "gap_recovered") if pd.notna(row[name])}
    return predictions, table, markdown, tracking.metric_records(metrics)


def plot_results(results_table: pd.DataFrame) -> tuple[plt.Figure, plt.Figure]:
    """Accuracy by method and task (95 % intervals), and latency by method."""
    return plots.accuracy_by_method(results_table), plots.latency_by_method(results_table)


def plot_training(stage1_history: pd.DataFrame, stage1_validation: pd.DataFrame, stage2_history: pd.DataFrame,
                  stage2_validation: pd.DataFrame) -> plt.Figure:
    """Stage-1 losses, stage-2 reward and both stages' validation accuracy."""
    return plots.training_curves(stage1_history, stage1_validation, stage2_history, stage2_validation)


def log_method_runs(results_table: pd.DataFrame) -> dict:
    """One nested MLflow run per method (tagged with it), same metric names, for the compare view.

    Runs after the results table is saved, so a tracking failure cannot lose results.

    Returns:
        ``{method: run_id}`` (empty with tracking off).
    """
    run_ids = {}
    for method, part in results_table.groupby("method", sort=False):
        with tracking.nested_run(f"eval-{method}", tags={"method": method}) as run_id:
            if run_id is None:
                continue
            metrics = {}
            for row in part.itertuples():
                metrics[f"accuracy_{row.task}"] = row.accuracy
                if row.task == "overall":
                    metrics.update(accuracy=row.accuracy, ci_low=row.ci_low, ci_high=row.ci_high,
                                   median_ms_per_query=row.median_ms_per_query, mean_new_tokens=row.mean_new_tokens)
                    if pd.notna(row.gap_recovered):
                        metrics["gap_recovered"] = row.gap_recovered
            tracking.log_metrics(metrics)
            run_ids[method] = run_id
    return run_ids
