"""The statistics of a results table: Wilson intervals, gap recovered with its paired bootstrap,
McNemar's exact test and its power, and :func:`summarize`, the table itself (one row per split,
method and task). Pure numbers on predictions; answering and scoring are :mod:`pilot.evaluation`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (well-behaved at 0 and 1)."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def gap_recovered(acc: float, acc_zero_shot: float, acc_plan: float) -> float:
    """(acc - acc_zero_shot) / (acc_plan_in_context - acc_zero_shot); NaN without a positive plan
    gap: when the plan does not help, "how much of the gap" has no meaning (a negative gap would turn
    methods below zero-shot into positive recoveries)."""
    gap = acc_plan - acc_zero_shot
    return (acc - acc_zero_shot) / gap if gap > 1e-12 else math.nan


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """McNemar's exact test (two-sided) of two methods answering the same questions: the
    discordant questions (right for one method only) split as a fair coin under the null,
    p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)]). 1.0 without discordant questions."""
    n, low = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2**n)


def mcnemar_power(questions: int, discordant: float, better_share: float, alpha: float = 0.05) -> float:
    """How often McNemar's exact test finds the better of two methods better (p < ``alpha``, in its
    favour) on ``questions`` shared questions, when each question is discordant with probability
    ``discordant`` and a discordant question goes to the better method with probability
    ``better_share``. Exact: summed over the binomial count of discordant questions and its split."""
    if not (0 <= discordant <= 1 and 0 <= better_share <= 1 and 0 < alpha < 1) or questions < 0:
        raise ValueError("mcnemar_power needs questions >= 0, discordant and better_share in [0, 1] and 0 < alpha < 1.")

    def log_pmf(n: int, k: int, p: float) -> float:
        if p in (0.0, 1.0):
            return 0.0 if k == (n if p == 1.0 else 0) else -math.inf
        return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                + k * math.log(p) + (n - k) * math.log1p(-p))

    power = 0.0
    for pairs in range(questions + 1):
        weight = math.exp(log_pmf(questions, pairs, discordant))
        if weight < 1e-15:
            continue
        # the worse method may win at most `allowed` discordant questions for p < alpha
        allowed, tail = -1, 0.0
        for wins in range((pairs + 1) // 2):
            tail += math.comb(pairs, wins) / 2**pairs
            if 2 * tail >= alpha:
                break
            allowed = wins
        power += weight * sum(math.exp(log_pmf(pairs, wins, 1 - better_share)) for wins in range(allowed + 1))
    return power


BOOTSTRAP_RESAMPLES = 2000


def _bootstrap_index(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) question indices drawn with replacement: the same draws for every method, so
    their differences are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_difference(first: Sequence[bool], second: Sequence[bool], level: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """Accuracy of ``second`` minus ``first`` on the same questions (in the same order): the
    difference, its paired-bootstrap 95 % interval (questions resampled), the discordant counts
    (``only_first``: right for the first method only) and McNemar's exact p-value."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or not len(a):
        raise ValueError("A paired comparison needs both methods' answers to the same, non-empty set of questions.")
    index = _bootstrap_index(len(a), seed=seed)
    low, high = _percentile_interval(b[index].mean(1) - a[index].mean(1), level)
    only_first, only_second = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    return {"n": len(a), "difference": float(b.mean() - a.mean()), "ci_low": low, "ci_high": high,
            "only_first": only_first, "only_second": only_second, "p_value": mcnemar_exact(only_first, only_second)}


def _paired_columns(predictions: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame | None:
    """(questions, methods) correctness of ``methods`` on the questions all of them answered; None
    if a method is missing."""
    present = predictions[predictions["method"].isin(methods)]
    if set(methods) - set(present["method"]):
        return None
    table = present.pivot_table(index="id", columns="method", values="correct", aggfunc="first")
    return table[list(methods)].dropna().astype(float)


def gap_recovered_interval(correct: pd.DataFrame, method: str, zero_shot: str, plan_in_context: str,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Gap recovered with its paired-bootstrap interval, only where the plan gap is clear.

    ``correct`` is (questions, methods) correctness on shared questions. The plan gap
    (plan-in-context minus zero-shot) is resampled with the questions; unless its interval lies
    above zero, "how much of the gap" has no meaning (a gap of a tenth of a point turns noise into
    a recovery of 10), so the result is (NaN, NaN, NaN). Otherwise: the point value and the
    interval of (acc - acc_zero) / gap over the same resamples.
    """
    values = correct[[method, zero_shot, plan_in_context]].to_numpy(dtype=float)
    if not len(values):
        return (math.nan, math.nan, math.nan)
    index = _bootstrap_index(len(values), seed=seed)
    means = values[index].mean(1)                       # (resamples, 3)
    gaps = means[:, 2] - means[:, 1]
    gap_low, _ = _percentile_interval(gaps, level)
    if not gap_low > 0:
        return (math.nan, math.nan, math.nan)
    point = gap_recovered(values[:, 0].mean(), values[:, 1].mean(), values[:, 2].mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = _percentile_interval((means[:, 0] - means[:, 1]) / gaps, level)
    return (point, low, high)


def summarize(predictions: pd.DataFrame, zero_shot: str = "zero_shot",
              plan_in_context: str = "plan_in_context", latency: pd.DataFrame | None = None,
              paired: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """One row per (split, method, task) plus an ``overall`` row per (split, method).

    Columns: accuracy with its 95 % interval, n, median latency per query (ms), mean generated
    tokens, and gap recovered against the zero-shot and plan-in-context rows of the same split
    and task, with its paired-bootstrap interval, only where the plan gap's own paired interval
    excludes zero (else NaN: undefined). For each ``(method, against)`` in ``paired``, the
    method's rows also carry ``paired_against``, the paired accuracy difference
    (``paired_difference`` with ``paired_ci_low`` / ``paired_ci_high``) and McNemar's exact
    ``paired_p_value``. With ``latency`` (:func:`pilot.latency.latency_table`, timed on the
    in-distribution test split), the ``test`` rows' latency columns come from that interleaved,
    warmed-up measurement instead of the batched evaluation's wall time.
    """
    if "split" not in predictions:
        predictions = predictions.assign(split="test")
    records = []
    groups = list(predictions.groupby(["split", "method", "task"]))
    groups += [((split, method, "overall"), part) for (split, method), part in predictions.groupby(["split", "method"])]
    for (split, method, task), part in groups:
        hits, n = int(part["correct"].sum()), len(part)
        low, high = wilson_interval(hits, n)
        records.append({
            "split": split, "method": method, "task": task, "n": n, "accuracy": hits / n,
            "ci_low": low, "ci_high": high,
            "median_ms_per_query": 1000 * float(part["seconds_per_query"].median()),
            "mean_new_tokens": float(part["new_tokens"].mean()),
        })
    table = pd.DataFrame.from_records(records)
    if latency is not None:
        measured = latency.set_index(["method", "task"])
        timed = table["split"] == "test"
        keys = list(zip(table["method"], table["task"]))
        table["median_ms_per_query"] = [measured["median_ms_per_query"].get(k, math.nan) if t else math.nan
                                        for k, t in zip(keys, timed)]
        table["timed_queries"] = [int(measured["timed_queries"].get(k, 0)) if t else 0 for k, t in zip(keys, timed)]
    reference = table.set_index(["split", "method", "task"])["accuracy"]
    for split, task in table[["split", "task"]].drop_duplicates().itertuples(index=False):
        gap = reference.get((split, plan_in_context, task), math.nan) - reference.get((split, zero_shot, task), math.nan)
        if gap <= 1e-12:  # NaN (no rows to compare) stays silent
            logger.warning("Task %s (%s split): plan-in-context does not beat zero-shot (plan gap %+.3f), so "
                           "gap_recovered is undefined (NaN) there; PILOT has nothing to imitate on it.",
                           task, split, gap)
    parts = {}
    for (split, task) in table[["split", "task"]].drop_duplicates().itertuples(index=False):
        rows = predictions[predictions["split"] == split]
        parts[(split, task)] = rows if task == "overall" else rows[rows["task"] == task]
    recovered, recovered_low, recovered_high = [], [], []
    for row in table.itertuples():
        shared = _paired_columns(parts[(row.split, row.task)],
                                 list(dict.fromkeys([row.method, zero_shot, plan_in_context])))
        value = gap_recovered_interval(shared, row.method, zero_shot, plan_in_context) if shared is not None \
            else (math.nan, math.nan, math.nan)
        recovered.append(value[0])
        recovered_low.append(value[1])
        recovered_high.append(value[2])
    table["gap_recovered"], table["gap_recovered_low"], table["gap_recovered_high"] = \
        recovered, recovered_low, recovered_high
    for column in ("paired_against", "paired_difference", "paired_ci_low", "paired_ci_high", "paired_p_value"):
        table[column] = "" if column == "paired_against" else math.nan
    for method, against in paired:
        for index in table.index[table["method"] == method]:
            row = table.loc[index]
            shared = _paired_columns(parts[(row["split"], row["task"])], [against, method])
            if shared is None or not len(shared):
                continue
            found = paired_difference(shared[against].to_numpy(), shared[method].to_numpy())
            table.loc[index, ["paired_against", "paired_difference", "paired_ci_low", "paired_ci_high",
                              "paired_p_value"]] = [against, found["difference"], found["ci_low"], found["ci_high"],
                                                    found["p_value"]]
    return table.sort_values(["split", "task", "method"]).reset_index(drop=True)
