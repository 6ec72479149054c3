"""Does this run repeat the published one? ``python -m pilot.reproduce`` (what ``make reproduce`` calls).

``check`` (the default) compares the predictions of the last run (``data/07_model_output/predictions.parquet``)
with the reference the README's table came from (``docs/runs/default.json``): it prints whether the
fingerprints match and, if not, which methods differ and in how many predictions, and exits 1 on a
mismatch. ``save`` writes such a reference from the last run, with the commit and thread policy that
produced it and the accuracies the README's table shows (a test checks the README against them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pilot.fingerprint import compare, reference

PREDICTIONS = Path("data/07_model_output/predictions.parquet")
REFERENCE = Path("docs/runs/default.json")


def accuracies(predictions: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """Accuracy per method, split and task (and ``overall``), rounded as the results table shows it."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for (method, split), part in predictions.groupby(["method", "split"], sort=True):
        scores = {task: round(float(rows["correct"].mean()), 3) for task, rows in part.groupby("task", sort=True)}
        table.setdefault(method, {})[split] = {**scores, "overall": round(float(part["correct"].mean()), 3)}
    return table


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_predictions(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SystemExit(f"No predictions at {path}: run `kedro run` (or `make reproduce`) first.")
    return pd.read_parquet(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", choices=("check", "save"), default="check")
    parser.add_argument("--predictions", type=Path, default=PREDICTIONS, help="the run's predictions table")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the published run's reference")
    parser.add_argument("--threads", default="threads: null (every computed value the same at any thread count)",
                        help="the thread policy that produced the run (save)")
    args = parser.parse_args(argv)
    predictions = _read_predictions(args.predictions)
    if args.action == "save":
        saved = reference(predictions, commit=_commit(), thread_policy=args.threads)
        saved["accuracy"] = accuracies(predictions)
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        # one line per field: the digests and ids are long, and a diff of the file should say which field moved
        args.reference.write_text("{\n" + ",\n".join(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}"
                                                   for key, value in saved.items()) + "\n}\n")
        print(f"Reference written to {args.reference}: fingerprint {saved['fingerprint']}, "
              f"{saved['predictions']} predictions.")
        return 0
    if not args.reference.is_file():
        raise SystemExit(f"No reference at {args.reference}: `python -m pilot.reproduce save` writes one from a run.")
    expected = json.loads(args.reference.read_text())
    result = compare(expected, predictions)
    print(f"Reference: {args.reference} (commit {expected.get('commit', '?')}, {expected.get('thread_policy', '?')}).")
    print(result.summary())
    return 0 if result.matches else 1


if __name__ == "__main__":
    sys.exit(main())
