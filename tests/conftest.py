"""Shared fixtures: small real components (reasoning-gym tasks, a BPE tokenizer, tiny models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
# One torch thread per process: the tests' models are tiny, and the suite runs kedro and tuning
# subprocesses beside itself, where two threads each on a 2-core machine oversubscribe it badly
# (measured: the in-memory pipeline tests took 17 s with one thread, 209 s with the default).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fcntl  # noqa: E402
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


# --- Running on two xdist workers (`make test`: `pytest -n 2 --dist loadgroup`) ------------------------------
#
# Tests that share an expensive fixture run on one worker, so no worker builds it again: every test that
# uses `finished_run` (a whole `kedro run`) in one group, in the order they are collected (test_run.py's
# ablation test, which adds runs to the store, stays after the tests that read it); the tests of a module
# that use one of its module-scoped fixtures (a project with the tune pipeline's inputs, PostgreSQL and the
# MLflow server, a Kedro-Viz build, ...) in one group per module. Every other test is scheduled on its own.
# The workers write each test's group to a file that the scheduler below reads (xdist 3.8's own
# `xdist_group` suffix on node ids has no effect on pytest 9, which stores node ids differently).
# Tests marked `alone` (timing beside a busy job of their own) run with the other worker paused between
# two of its tests: see `pytest_runtest_protocol` below.

CHEAP_SHARED = {"task_table", "tokenizer"}  # session fixtures that take a second: built once per worker


def _group(item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    if marker is not None:
        return str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
    if "finished_run" in item.fixturenames:
        return "finished_run"
    fixtures = getattr(item, "_fixtureinfo", None)
    for name, definitions in (fixtures.name2fixturedefs.items() if fixtures is not None else ()):
        if name in CHEAP_SHARED or not definitions:
            continue
        if definitions[-1].scope in ("module", "package", "session") and \
                getattr(definitions[-1].func, "__module__", "").startswith("tests"):
            return item.nodeid.split("::")[0]
    return None


def _groups_file(config) -> Path:
    """Beside the workers' temporary folders (…/pytest-N/popen-gw0, …): the controller's own basetemp."""
    base = config._tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdist-groups.json"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import json

    groups = {item.nodeid: group for item in items if (group := _group(item)) is not None}
    path = _groups_file(config)
    scratch = path.with_name(f"{path.name}.{os.environ['PYTEST_XDIST_WORKER']}")
    scratch.write_text(json.dumps(groups))
    os.replace(scratch, path)  # every worker collects the same tests: the same file


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: xdist's scheduling by scope (a group's tests in one batch to one worker, the
    largest groups first), with the groups the workers wrote."""
    if config.getoption("dist") != "loadgroup":
        return None
    import json

    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(_groups_file(config).read_text())
            plain = nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid
            return self.groups.get(plain, nodeid)

    return GroupScheduling(config, log)


class _SuiteLock:
    """A readers-writer lock shared by the xdist workers of one run (files beside their temporary folders):
    every test holds it shared; a test marked `alone` holds it exclusively. The `turnstile` makes a waiting
    exclusive test go before the other worker's next test, so it waits at most for the test running there."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.turnstile = open(folder / "suite.turnstile", "a")
        self.tests = open(folder / "suite.lock", "a")

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        try:
            if not exclusive:
                fcntl.flock(self.turnstile, fcntl.LOCK_UN)
            fcntl.flock(self.tests, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(self.tests, fcntl.LOCK_UN)
        finally:
            if exclusive:
                fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def close(self) -> None:
        self.turnstile.close()
        self.tests.close()


_suite_lock: _SuiteLock | None = None


def pytest_unconfigure(config):
    global _suite_lock
    if _suite_lock is not None:
        _suite_lock.close()
        _suite_lock = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist, hold the suite lock for each test's setup, call and teardown (see `_SuiteLock`)."""
    global _suite_lock
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # one process: nothing runs beside a test
        yield
        return
    if _suite_lock is None:  # the workers' basetemps (…/popen-gw0, …/popen-gw1) share a parent
        _suite_lock = _SuiteLock(item.config._tmp_path_factory.getbasetemp().parent / "suite-lock")
    with _suite_lock.hold(exclusive=item.get_closest_marker("alone") is not None):
        yield

