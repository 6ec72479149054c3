"""Shared fixtures: small real components (reasoning-gym tasks, a BPE tokenizer, tiny models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
# One torch thread per process: the tests' models are tiny, and the suite runs kedro and tuning
# subprocesses beside itself, where two threads each on a 2-core machine oversubscribe it badly
# (measured: the in-memory pipeline tests took 17 s with one thread, 209 s with the default).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pilot.models import build_causal_lm, train_tokenizer  # noqa: E402
from pilot.prompts import answer_prompt, continuation  # noqa: E402
from pilot.tasks import build_task_table  # noqa: E402

TASKS = [
    {"name": "chain_sum", "size": 120, "kwargs": {"min_terms": 3, "max_terms": 4, "min_digits": 1, "max_digits": 1}},
    {"name": "basic_arithmetic", "size": 120,
     "kwargs": {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"]}},
]


@pytest.fixture(scope="session")
def task_table() -> pd.DataFrame:
    return build_task_table(TASKS, val_per_task=10, test_per_task=20, seed=0)


@pytest.fixture(scope="session")
def tokenizer(task_table):
    texts = [answer_prompt(q, p) + continuation(a)
             for q, p, a in zip(task_table["question"], task_table["oracle_plan"], task_table["answer"])]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture()
def tiny_lm(tokenizer):
    """A randomly initialised 2-layer Llama student (fresh per test: tests may attach hooks)."""
    torch.manual_seed(0)
    return build_causal_lm(tokenizer, family="llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)


ROOT = Path(__file__).resolve().parents[1]


def stage1_inputs(lm, task_table: pd.DataFrame, tmp_path: Path):
    """Oracle plans for every row, a small guidance site, and their latent cache in ``tmp_path/cache``."""
    from pilot.config import GuidanceParams, LatentsParams
    from pilot.latents import plan_cache_build, write_cache

    plans = task_table[["id", "task", "split"]].assign(plan=task_table["oracle_plan"], kept=True)
    site = GuidanceParams(read_layer=-1, reader="mean", modulation="add", init_log_std=-1.0, mlp_hidden=16,
                          attention_heads=2)
    latents = LatentsParams(shard_size=64, batch_size=128)
    write_cache(plan_cache_build(plans, task_table, lm, site, latents), tmp_path / "cache")
    return plans, site, latents


def make_project(tmp_path: Path) -> Path:
    """A copy of the project's configuration in a fresh folder (its own data/ and mlflow.db)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / ".telemetry", project)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()  # the package itself is installed; Kedro only checks the folder
    # An absolute store per project: MLflow caches stores by URI, and every copy would otherwise
    # share the relative `sqlite:///mlflow.db`.
    (project / "conf" / "test" / "mlflow.yml").write_text(
        f"server:\n  mlflow_tracking_uri: sqlite:///{project / 'mlflow.db'}\n")
    return project


def run(project: Path, monkeypatch, pipeline: str | None = None, env: str = "test", params: dict | None = None):
    """``kedro run`` in-process, through a real KedroSession."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    monkeypatch.chdir(project)
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
        return session.run(pipeline_names=[pipeline] if pipeline else None)


def same_code_env() -> dict[str, str]:
    """The environment for a child process that imports the very ``pilot`` under test (a relative
    PYTHONPATH such as ``src`` would resolve elsewhere once the child runs in another folder)."""
    import pilot

    here = str(Path(pilot.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}


def kedro_cli(project: Path, *args: str) -> subprocess.Popen:
    """``kedro ...`` as a separate process in ``project`` (stdout and stderr captured)."""
    return subprocess.Popen([str(Path(sys.executable).with_name("kedro")), *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**same_code_env(), "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200"})


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One full `kedro run --env test`, shared by the assertions below."""
    monkeypatch = pytest.MonkeyPatch()
    project = make_project(tmp_path_factory.mktemp("run"))
    try:
        run(project, monkeypatch)
        yield project
    finally:
        monkeypatch.undo()
        mlflow.set_tracking_uri(None)


def require_component(found: bool, missing: str) -> None:
    """Skip a test whose real component (Chromium, PostgreSQL, ...) is missing here, but fail it in CI
    (``CI=true``), where `.ci/run` installs every component: a green CI must have run it."""
    if found:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{missing} (CI=true: a missing component is a failure, not a skip).")
    pytest.skip(missing)


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` refuses new files and deletions inside it for the duration.

    For a normal user that is chmod 555. Root (the usual user in these containers) ignores mode
    bits, so there the folder is made immutable (``chattr +i``), which binds root too; the test
    is skipped where the filesystem or the container's capabilities do not allow it.
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a folder read-only for root here (chattr +i refused)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
