"""Nodes of the ``evaluation`` pipeline: every compared method on the same test split, then the report.

Each method (:mod:`pilot.methods`) is built by one node from its inputs and answers in another,
through the shared generation-and-scoring path with the same decoding settings; latency, the
method settings and the MLflow child runs take the gathered list of methods.
"""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt
import pandas as pd

from pilot import plots, tracking
from pilot.config import EvaluationParams, GenerationParams
from pilot.fingerprint import fingerprint
from pilot.latency import answerer, latency_table, measure_latency
from pilot.latents import select_examples
from pilot.methods import Method, TrainingData
from pilot.methods.pilot import Pilot
from pilot.methods.registry import compared_methods
from pilot.models import CausalLM
from pilot.serving import log_pilot_model
from pilot.statistics import summarize

logger = logging.getLogger(__name__)


def evaluate_method(method: Method, student: CausalLM, tasks_test: pd.DataFrame,
                    generation: GenerationParams) -> pd.DataFrame:
    """``method``'s answers to every test question, scored (:meth:`pilot.methods.base.Method.answer`).

    Returns:
        ``predictions_<method>``: one row per question.
    """
    predictions = method.answer(student, tasks_test, generation)
    logger.info("%s: test accuracy %.3f", method.name, predictions["correct"].mean())
    return predictions


def gather_methods(*parts: Method | list[Method]) -> list[Method]:
    """The methods (or lists of them) as one list, in order."""
    return [method for part in parts for method in (part if isinstance(part, list) else [part])]


def gather_predictions(*parts: pd.DataFrame) -> pd.DataFrame:
    """Every method's predictions as one table, in order."""
    return pd.concat(parts, ignore_index=True)


def fingerprint_results(predictions: pd.DataFrame) -> dict:
    """The run's results fingerprint (:mod:`pilot.fingerprint`): one short hash of every method's reply to
    every question, and one per method; logged, and set as the MLflow tags ``results.fingerprint`` and
    ``results.fingerprint.<method>``.

    Returns:
        ``results_fingerprint``: ``{"fingerprint", "methods", "predictions"}``.
    """
    result = fingerprint(predictions)
    logger.info("Results fingerprint %s (%d predictions; `python -m pilot.reproduce` compares them with the "
                "README's run). Per method: %s", result["fingerprint"], result["predictions"],
                ", ".join(f"{method} {digest}" for method, digest in result["methods"].items()))
    tracking.set_tags({"results.fingerprint": result["fingerprint"],
                       **{f"results.fingerprint.{method}": digest for method, digest in result["methods"].items()}})
    return result


def measure_method_latency(methods: list[Method], student: CausalLM, tasks_test: pd.DataFrame,
                           generation: GenerationParams, evaluation: EvaluationParams) -> pd.DataFrame:
    """Every method's latency on the same questions, one at a time, warmed up and interleaved.

    Returns:
        ``latency_table``: median ms per query per (method, task) and overall.
    """
    settings = evaluation.latency
    in_distribution = tasks_test[tasks_test["split"] == "test"] if "split" in tasks_test else tasks_test
    timed = in_distribution.groupby("task", sort=True).head(settings.questions_per_task).reset_index(drop=True)
    answerers = {method.name: answerer(method, student, timed, generation) for method in methods}
    timings = measure_latency(answerers, len(timed), settings.passes, settings.warmup_questions, progress=True)
    table = latency_table(timings, timed["task"].tolist())
    overall = table[table["task"] == "overall"].set_index("method")["median_ms_per_query"]
    logger.info("Latency (median ms per query, %d questions x %d passes): %s", len(timed), settings.passes,
                ", ".join(f"{m} {v:.2f}" for m, v in overall.items()))
    return table


def build_report(latency: pd.DataFrame, predictions: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """The results table (parquet + markdown) and overall metrics.

    Accuracy comes from the predictions; latency from ``latency`` (:func:`measure_method_latency`).

    Returns:
        ``results_table``, ``results_markdown``, ``results_metrics``.
    """
    # a method paired with another (Method.paired_with): their answers to the same questions, compared one by one
    paired = [(name, method.paired_with) for name, method in compared_methods().items() if method.paired_with]
    table = summarize(predictions, latency=latency, paired=paired)
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
                "where the plan gap's own paired interval does not exclude zero. `paired_difference`: the "
                "row's method minus the one it is paired with (`vs`) on the same questions, its 95 % paired-"
                "bootstrap interval and McNemar's exact p-value.\n")
    overall = table[table["task"] == "overall"]
    prefix = {"test": "", "test_ood": "ood_"}
    metrics = {f"{row['method']}_{prefix.get(row['split'], row['split'] + '_')}{name}": row[name]
               for _, row in overall.iterrows()
               for name in ("accuracy", "gap_recovered", "gap_recovered_low", "gap_recovered_high",
                            "paired_difference", "paired_ci_low", "paired_ci_high", "paired_p_value")
               if pd.notna(row[name])}
    return table, markdown, tracking.metric_records(metrics)


def plot_results(results_table: pd.DataFrame) -> tuple[plt.Figure, plt.Figure]:
    """Accuracy by method and task (95 % intervals), and latency by method."""
    return plots.accuracy_by_method(results_table), plots.latency_by_method(results_table)


def plot_training(stage1_history: pd.DataFrame, stage1_validation: pd.DataFrame, stage2_history: pd.DataFrame,
                  stage2_validation: pd.DataFrame) -> plt.Figure:
    """Stage-1 losses, stage-2 reward and both stages' validation accuracy."""
    return plots.training_curves(stage1_history, stage1_validation, stage2_history, stage2_validation)


def describe_training_data(teacher_plans: pd.DataFrame, tasks_train: pd.DataFrame, seed: int) -> TrainingData:
    """The run's seed and the rows the methods learn from: the training split (LoRA, ReFT, pause
    tokens, soft thoughts, PILOT stage 2) and the kept teacher plans in the latent cache (stage 1, CAA)."""
    cached = len(select_examples(teacher_plans, tasks_train))
    return TrainingData(seed=seed, training_rows=len(tasks_train), cached_rows=cached)


def describe_methods(methods: list[Method], training_data: TrainingData) -> dict[str, dict[str, str]]:
    """What each method is, under the same keys for every method (``pilot.methods.METHOD_SETTINGS``).

    Training steps are the configured optimizer steps behind the method (PILOT stage 2: stage 1's
    plus its own); training data rows are the rows it learned from.

    Returns:
        ``method_settings``: ``{method: {setting: value as text, "" where it does not apply}}``.
    """
    return {method.name: method.settings(training_data) for method in methods}


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


def log_trained_model(served: Pilot, student: CausalLM, generation: GenerationParams,
                      evaluation: EvaluationParams) -> dict:
    """The trained PILOT (student + stage-2 hyper-network) as an MLflow pyfunc model, registered
    under ``evaluation.registered_model_name``; load it with ``mlflow.pyfunc.load_model``.

    Returns:
        ``trained_model``: its run id, model URI and registered name and version (empty with tracking off).
    """
    info = log_pilot_model(student, served.hypernet, generation=generation, name=evaluation.model_name,
                           registered_model_name=evaluation.registered_model_name)
    if info:
        logger.info("Trained PILOT logged as %s (registered: %s %s)", info["model_uri"],
                    info["registered_model_name"] or "no", info["registered_model_version"])
    return info
