"""The results fingerprint and the reproduce check: what changes it, what does not, and what a mismatch says."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from pilot import reproduce
from pilot.fingerprint import compare, fingerprint, reference
from tests.conftest import ROOT


def predictions() -> pd.DataFrame:
    rows = []
    for method in ("zero_shot", "pilot_stage2"):
        for split, ids in (("test", range(6)), ("test_ood", range(100, 103))):
            for question in ids:
                reply = f"{question % 4}\n" if method == "zero_shot" else f"{question % 5}\n"
                rows.append({"method": method, "id": f"chain_sum-{question}", "task": "chain_sum", "split": split,
                             "prediction": reply.strip(), "reply": reply, "correct": question % 2 == 0,
                             "new_tokens": 2, "seconds_per_query": 0.01 * question})
    return pd.DataFrame(rows)


def test_fingerprint_ignores_row_order_and_timing_and_sees_one_changed_reply():
    table = predictions()
    base = fingerprint(table)
    assert base["predictions"] == 18 and set(base["methods"]) == {"zero_shot", "pilot_stage2"}
    shuffled = table.sample(frac=1, random_state=0).assign(seconds_per_query=9.9)
    assert fingerprint(shuffled) == base
    changed = table.copy()
    changed.loc[(changed["method"] == "pilot_stage2") & (changed["id"] == "chain_sum-101"), "reply"] = "7\n"
    moved = fingerprint(changed)
    assert moved["fingerprint"] != base["fingerprint"]
    assert moved["methods"]["zero_shot"] == base["methods"]["zero_shot"]
    assert moved["methods"]["pilot_stage2"] != base["methods"]["pilot_stage2"]


def test_compare_names_the_methods_and_counts_the_predictions_that_moved():
    table = predictions()
    expected = json.loads(json.dumps(reference(table, commit="abc1234")))   # as read back from its file
    assert compare(expected, table).matches
    changed = table.copy()
    moved = (changed["method"] == "zero_shot") & changed["id"].isin(["chain_sum-1", "chain_sum-2", "chain_sum-100"])
    changed.loc[moved, "reply"] = "x\n"
    result = compare(expected, changed[changed["method"] != "pilot_stage2"])
    assert not result.matches
    assert result.differing == {"zero_shot": (3, 9)}
    assert result.missing == ["pilot_stage2"] and result.extra == []
    assert "zero_shot: 3 of 9 predictions differ" in result.summary()
    assert "pilot_stage2: in the reference, not in this run" in result.summary()


def test_reproduce_saves_a_reference_and_checks_a_rerun_against_it(tmp_path, capsys):
    table = predictions()
    path, saved = tmp_path / "predictions.parquet", tmp_path / "runs" / "default.json"
    table.to_parquet(path)
    assert reproduce.main(["save", "--predictions", str(path), "--reference", str(saved)]) == 0
    written = json.loads(saved.read_text())
    assert written["accuracy"]["zero_shot"]["test"] == {"chain_sum": 0.5, "overall": 0.5}
    assert written["fingerprint"] == fingerprint(table)["fingerprint"]
    assert reproduce.main(["check", "--predictions", str(path), "--reference", str(saved)]) == 0
    assert "Same predictions as the reference" in capsys.readouterr().out
    table.loc[0, "reply"] = "changed\n"
    table.to_parquet(path)
    assert reproduce.main(["check", "--predictions", str(path), "--reference", str(saved)]) == 1
    assert "zero_shot: 1 of 9 predictions differ" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="run `kedro run`"):
        reproduce.main(["check", "--predictions", str(tmp_path / "none.parquet"), "--reference", str(saved)])


def test_a_table_without_replies_is_refused_with_what_it_must_be():
    with pytest.raises(ValueError, match="lacks the column.*'reply'.*predictions"):
        fingerprint(predictions().drop(columns="reply"))


# The README's results table rows, in the registry's order of the methods it shows.
README_ROWS = ("zero_shot", "plan_in_context", "pilot_stage1", "pilot_stage2", "lora", "reft", "caa", "pause_tokens",
               "soft_thoughts", "static_guidance", "bias_steering")


def test_the_readme_shows_the_committed_default_run_and_its_fingerprint():
    """The README's table is the run that docs/runs/default.json records, number for number."""
    saved = json.loads((ROOT / reproduce.REFERENCE).read_text())
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results of the default run", 1)[1].split("\n## ", 1)[0]
    assert f"`{saved['fingerprint']}`" in section, "the README's fingerprint is not the committed run's"
    assert saved["commit"] in section, "the README names another commit than the committed run's"
    rows = [line for line in section.splitlines() if line.startswith("| ") and re.search(r"\d\.\d{3}", line)]
    assert len(rows) == len(README_ROWS)
    for method, line in zip(README_ROWS, rows):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        accuracy = saved["accuracy"][method]
        shown = [float(cells[1]), float(cells[2]), float(cells[3].split()[0]), float(cells[4].split()[0])]
        assert shown == [accuracy["test"]["chain_sum"], accuracy["test"]["basic_arithmetic"],
                         accuracy["test"]["overall"], accuracy["test_ood"]["overall"]], method
