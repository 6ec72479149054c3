"""A run's results fingerprint: one short hash of every prediction it made, and the check against a reference.

Two runs have the same fingerprint exactly when every method replied the same text to every question
of every split. The hash covers each reply as generated (not only the extracted answer), in a fixed
order (method, split, question id), so it does not depend on the order the methods ran in. Latency is
measured, not predicted, and is left out.

A *reference* (:func:`reference`) adds, per method and split, one short digest per question, so a
rerun that does not match says which methods moved and how many of their predictions
(:func:`compare`); ``python -m pilot.reproduce`` prints that for the default run against
``docs/runs/default.json``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd

KEYS = ("method", "split", "id")
DIGEST_CHARS = 8      # per prediction: a collision that hides a change has odds of 1 in 4 billion
FINGERPRINT_CHARS = 12


def _ordered(predictions: pd.DataFrame) -> pd.DataFrame:
    missing = [column for column in (*KEYS, "reply") if column not in predictions]
    if missing:
        raise ValueError(f"The predictions table lacks the column(s) {missing}: it must be the evaluation "
                         "pipeline's `predictions` (data/07_model_output/predictions.parquet).")
    return predictions.sort_values(list(KEYS), kind="stable")


def _digest(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:chars]


def prediction_digests(predictions: pd.DataFrame) -> pd.Series:
    """One short digest per prediction (its method, split, id and reply), indexed by (method, split, id)."""
    rows = _ordered(predictions)
    digests = [_digest("\x1f".join(map(str, key)) + "\x1e" + str(reply), DIGEST_CHARS)
               for key, reply in zip(rows[list(KEYS)].itertuples(index=False), rows["reply"])]
    return pd.Series(digests, index=pd.MultiIndex.from_frame(rows[list(KEYS)]), name="digest")


def fingerprint(predictions: pd.DataFrame) -> dict:
    """``{"fingerprint": <all predictions>, "methods": {method: <its predictions>}, "predictions": n}``."""
    return _fingerprint_of(prediction_digests(predictions))


def _fingerprint_of(digests: pd.Series) -> dict:
    methods = {method: _digest("".join(part), FINGERPRINT_CHARS)
               for method, part in digests.groupby(level="method", sort=True)}
    return {"fingerprint": _digest("".join(digests), FINGERPRINT_CHARS), "methods": methods,
            "predictions": int(len(digests))}


def reference(predictions: pd.DataFrame, **about: str) -> dict:
    """The fingerprint plus, per method and split, the questions' digests in id order (and the ids once
    per split), so a later run can be compared prediction by prediction. ``about`` (commit, thread policy)
    is kept beside them."""
    digests = prediction_digests(predictions)
    ids: dict[str, list] = {}
    per_method: dict[str, dict[str, str]] = {}
    for (method, split), part in digests.groupby(level=["method", "split"], sort=True):
        question_ids = part.index.get_level_values("id").tolist()
        known = ids.setdefault(split, question_ids)
        if known != question_ids:
            raise ValueError(f"Method '{method}' answered other questions of split '{split}' than the others.")
        per_method.setdefault(method, {})[split] = "".join(part)
    return {**about, **_fingerprint_of(digests), "ids": ids, "digests": per_method}


@dataclass(frozen=True)
class Comparison:
    """How a run's predictions compare with a reference's."""

    fingerprint: str
    expected: str
    differing: dict[str, tuple[int, int]]    # method -> (predictions that differ, predictions compared)
    missing: list[str]                       # methods the reference has and the run lacks
    extra: list[str]                         # methods the run has and the reference lacks

    @property
    def matches(self) -> bool:
        return self.fingerprint == self.expected

    def summary(self) -> str:
        if self.matches:
            return f"Same predictions as the reference: fingerprint {self.fingerprint}."
        lines = [f"Predictions differ from the reference: fingerprint {self.fingerprint}, expected {self.expected}."]
        lines += [f"  {method}: {changed} of {total} predictions differ"
                  for method, (changed, total) in self.differing.items()]
        lines += [f"  {method}: in the reference, not in this run" for method in self.missing]
        lines += [f"  {method}: in this run, not in the reference" for method in self.extra]
        return "\n".join(lines)


def compare(expected: dict, predictions: pd.DataFrame) -> Comparison:
    """This run's ``predictions`` against a :func:`reference`: which methods differ, and by how many predictions."""
    digests = prediction_digests(predictions)
    ran = set(digests.index.get_level_values("method"))
    differing = {}
    for method, splits in sorted(expected["digests"].items()):
        if method not in ran:
            continue
        changed = total = 0
        for split, joined in splits.items():
            wanted = dict(zip(expected["ids"][split], (joined[i:i + DIGEST_CHARS]
                                                        for i in range(0, len(joined), DIGEST_CHARS))))
            try:
                got = digests.xs((method, split), level=("method", "split"))
            except KeyError:
                got = pd.Series(dtype=str)
            got_by_id = dict(zip(got.index, got))
            total += len(wanted)
            changed += sum(got_by_id.get(question) != digest for question, digest in wanted.items())
            changed += sum(question not in wanted for question in got_by_id)
        if changed:
            differing[method] = (changed, total)
    return Comparison(fingerprint=_fingerprint_of(digests)["fingerprint"], expected=expected["fingerprint"],
                      differing=differing, missing=sorted(set(expected["digests"]) - ran),
                      extra=sorted(ran - set(expected["digests"])))
