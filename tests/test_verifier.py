"""The verifier: strict answer grammars in front of reasoning-gym's scorers, scorers in a sandbox."""

import json
import os
import socket
import time

import pytest
import reasoning_gym

from pilot.answers import check_scorable, parse_answer, scorable_tasks
from pilot.config import ParameterError, validate
from pilot.tasks import DataParams, check_task_name
from pilot.verifier import Verifier, score_answers

# The accepted families whose reasoning-gym scorer evaluates the answer (sympy or eval).
EVALUATING_SCORERS = ["countdown", "puzzle24", "polynomial_multiplication", "simple_integration",
                      "string_insertion", "spiral_matrix", "n_queens", "binary_matrix"]
PROBES = "tests.verifier_scorers"

# Each would touch {marker} (or print, or hang, or exhaust memory) if any scorer evaluated it.
HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "__import__(\"os\").system(\"touch {marker}\")",
    "getattr(__import__('o'+'s'), 'sys'+'tem')('touch {marker}')",
    "Function('sys'+'tem')('touch {marker}')",
    "eval('__imp'+'ort__(\"os\").system(\"touch {marker}\")')",
    "exec(\"open('{marker}', 'w')\")",
    "(lambda: __builtins__['__imp'+'ort__']('os').system('touch {marker}'))()",
    "[__import__('os').system('touch {marker}')]",
    "[['Q', __import__('os').system('touch {marker}')]]",
    "''.join(chr(c) for c in [116, 111, 117, 99, 104])",
    "Symbol('x').__class__.__mro__[-1].__subclasses__()",
    "ｅｘｅｃ(\"open('{marker}', 'w')\")",   # fullwidth letters: Python reads them as exec
    "𝐞𝐯𝐚𝐥(\"open('{marker}', 'w')\")",         # mathematical bold: likewise eval
    "x + __import__('os').system('touch {marker}')",
    "1 + 1; import os; os.system('touch {marker}')",
    "ABC' + __import__('os').system('touch {marker}') + '",
    "print(\"EXECUTED\")",
    "9**9**9",
    "9^9^9",
    "10**10**10 + 1",
    "x**99999999",
    "x**2**99",
    "(x + 1)**999999",
    "99999999!",
    "1e999999",
    "9" * 5000,
    "((" * 200 + "1" + "))" * 200,
    "1" + " + 1" * 2000,
    "x" * 1_000_000,
    "٣ + ٤",                                  # Arabic-Indic digits
    "１ + ２",                                 # fullwidth digits
    "1\u202e2",                               # right-to-left override
    "1\u200b+2",                              # zero-width space
    "\x00",
    "",
    "{\"id\": 1, \"score\": 1.0}",
    "1\n{\"id\": 2, \"nonce\": \"\", \"score\": 1.0}",
]

# An answer of each task's answer type that no generated question has as its answer.
WRONG_BUT_PARSING = {
    "basic_arithmetic": "-999999", "chain_sum": "-999999", "count_bits": "-1", "gcd": "-1", "lcm": "-1",
    "leg_counting": "-1", "fraction_simplification": "-1/1", "path_star": "-1 -2", "spiral_matrix": "-1 -2",
    "binary_matrix": "-1 -1\n-1 -1", "n_queens": "Q Q\nQ Q", "string_insertion": "ZZZ", "countdown": "1 + 1",
    "puzzle24": "1 + 1", "polynomial_multiplication": "x + 1", "simple_integration": "x + 1",
}


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(timeout_s=5.0)
    yield v
    v.close()


@pytest.fixture(scope="module")
def probe():
    """A verifier whose worker also has the fake scorers of tests/verifier_scorers.py."""
    v = Verifier(timeout_s=5.0, scorer_module=PROBES)
    yield v
    v.close()


@pytest.fixture(scope="module")
def gold_entries():
    return {task: list(reasoning_gym.create_dataset(task, seed=7, size=5)) for task in scorable_tasks()}


def _score(verifier, task, entry, answers):
    n = len(answers)
    return verifier.score([task] * n, answers, [entry["answer"]] * n, [json.dumps(entry["metadata"])] * n)


def _layer_holds(verifier, *names):
    """Whether the worker reported any of these sandbox layers as applied on this machine."""
    return any(not verifier.sandbox[name].startswith("not ") for name in names)


# ------------------------------------------------------------------ grammars
def test_every_accepted_task_parses_its_own_gold_answers():
    for task in scorable_tasks():
        for entry in reasoning_gym.create_dataset(task, seed=11, size=20):
            assert parse_answer(task, entry["answer"]) is not None, (task, entry["answer"])


@pytest.mark.parametrize("task, answer, canonical", [
    ("chain_sum", " 214 ", "214"),
    ("chain_sum", "+01,000.00", "+01,000.00"),
    ("chain_sum", "214.", "214."),
    ("count_bits", "-7", "-7"),
    ("countdown", "94*4 - 61 - 6", "94 * 4 - 61 - 6"),
    ("puzzle24", "-(3 - 9) * (8 / 2)", "- ( 3 - 9 ) * ( 8 / 2 )"),
    ("polynomial_multiplication", "3584*x**5 - 896*x**3", "3584 * x ** 5 - 896 * x ** 3"),
    ("simple_integration", "-34*x**8/15 - 5*x/4 + C", "- 34 * x ** 8 / 15 - 5 * x / 4 + C"),
    ("fraction_simplification", "$244/607$", "244/607"),
    ("fraction_simplification", "\\frac{3}{4}", "3/4"),
    ("path_star", "17611  12302\t63944", "17611 12302 63944"),
    ("binary_matrix", "1 0 1\r\n0  1 0\n", "1 0 1\n0 1 0"),
    ("n_queens", "_ Q\nQ _", "_ Q\nQ _"),
    ("string_insertion", "EACADDDDB", "EACADDDDB"),
])
def test_a_scorer_sees_the_answer_written_out_from_its_parse(task, answer, canonical):
    assert parse_answer(task, answer) == canonical


@pytest.mark.parametrize("task, answer", [
    ("countdown", "2**10"),                    # no power on numbers at all
    ("countdown", "x + 1"),                    # no names in plain arithmetic
    ("countdown", "1.5.5"),
    ("countdown", "(" * 17 + "1" + ")" * 17),  # deeper than MAX_DEPTH
    ("countdown", "-" * 17 + "1"),
    ("countdown", "1" + " + 1" * 250),         # more than MAX_TOKENS
    ("countdown", "1 +"),
    ("polynomial_multiplication", "x**100"),   # power literal of three digits
    ("polynomial_multiplication", "2**x"),
    ("polynomial_multiplication", "(x + 1)**2"),
    ("polynomial_multiplication", "x**-1"),
    ("polynomial_multiplication", "E**2 + I"),  # only the task's variables
    ("polynomial_multiplication", "x^2"),
    ("chain_sum", "9" * 41),
    ("chain_sum", "1e5"),
    ("chain_sum", "0x1F"),
    ("chain_sum", "٤٢"),
    ("binary_matrix", "1 0\n1"),               # not rectangular
    ("n_queens", "Q _ _\n_ _ Q"),              # not square
    ("n_queens", "Q X\n_ _"),
    ("spiral_matrix", "[1, 2, 3]"),
    ("string_insertion", "abc"),
    ("string_insertion", "A_B"),
    ("fraction_simplification", "3"),
])
def test_answers_outside_the_grammar_do_not_parse(task, answer):
    assert parse_answer(task, answer) is None


def test_non_strings_do_not_parse():
    for answer in (None, 42, 4.2, b"42", ["4", "2"]):
        assert parse_answer("chain_sum", answer) is None


# ------------------------------------------------------------------ scoring
def test_correct_answers_of_every_accepted_task_score_one(verifier, gold_entries):
    tasks, answers, metadatas, questions = [], [], [], []
    for task, entries in gold_entries.items():
        for entry in entries:
            tasks.append(task)
            answers.append(entry["answer"])
            metadatas.append(json.dumps(entry["metadata"]))
            questions.append(entry["question"])
    scored_before = verifier.stats.scored
    assert verifier.score(tasks, answers, answers, metadatas, questions) == [1.0] * len(tasks)
    assert verifier.stats.scored - scored_before == len(tasks)  # every one reached its scorer


def test_wrong_answers_that_parse_score_zero(verifier, gold_entries):
    countdown = gold_entries["countdown"][0]
    assert _score(verifier, "countdown", countdown, [countdown["answer"], "1 + 1", "1 / 0"]) == [1.0, 0.0, 0.0]
    chain = gold_entries["chain_sum"][0]
    assert _score(verifier, "chain_sum", chain, [str(int(chain["answer"]) + 1)]) == [0.0]


def test_the_task_table_answers_score_one(verifier, task_table):
    rows = task_table.head(20)
    assert verifier.score(rows["task"], rows["answer"], rows["answer"], rows["metadata"], rows["question"]) == [1.0] * 20


@pytest.mark.parametrize("task", scorable_tasks())
def test_hostile_answers_are_rejected_before_any_scorer_and_execute_nothing(verifier, gold_entries, task,
                                                                            tmp_path, capfd):
    entry = gold_entries[task][0]
    markers = [tmp_path / f"executed-{i}" for i in range(len(HOSTILE))]
    answers = [template.replace("{marker}", str(marker)) for template, marker in zip(HOSTILE, markers)]
    rejected_before, scored_before = verifier.stats.rejected_by_grammar, verifier.stats.scored
    started = time.perf_counter()
    assert _score(verifier, task, entry, answers) == [0.0] * len(HOSTILE)
    assert time.perf_counter() - started < 5
    assert verifier.stats.rejected_by_grammar - rejected_before == len(HOSTILE)
    assert verifier.stats.scored == scored_before
    assert not [marker.name for marker in markers if marker.exists()]
    assert "EXECUTED" not in capfd.readouterr().out


@pytest.mark.parametrize("task", EVALUATING_SCORERS)
def test_raw_payloads_that_reach_a_real_evaluating_scorer_still_cannot_act(verifier, gold_entries, task, tmp_path):
    # The grammar is bypassed on purpose: this is the sandbox alone, as if a grammar had a hole.
    entry = gold_entries[task][0]
    verifier.score([task], [entry["answer"]], [entry["answer"]], [entry["metadata"]])  # a worker is running
    if not _layer_holds(verifier, "landlock", "seccomp"):
        pytest.skip(f"neither Landlock nor seccomp holds here: {verifier.sandbox}")
    command, written = tmp_path / "command-ran", tmp_path / "file-written"
    payloads = [f"__import__('os').system('touch {command}')",
                f"[__import__('os').system('touch {command}')]",
                f"__import__('subprocess').run(['touch', '{command}'])"]
    if _layer_holds(verifier, "landlock"):
        payloads.append(f"open('{written}', 'w').write('x')")
    scores = verifier._run_scorers([task] * len(payloads), payloads, [entry] * len(payloads))
    assert all(score < 1.0 for score in scores)
    assert not command.exists() and not written.exists()


def test_ten_thousand_hostile_answers_in_one_batch(verifier, gold_entries, tmp_path):
    marker = tmp_path / "executed"
    hostile = [template.replace("{marker}", str(marker)) for template in HOSTILE]
    tasks = scorable_tasks()
    batch_tasks, answers = [], []
    for i in range(10_000):
        task = tasks[i % len(tasks)]
        batch_tasks.append(task)
        # One answer in 50 parses but is wrong, so the batch also keeps a worker busy.
        answers.append(WRONG_BUT_PARSING[task] if i % 800 < len(tasks) else hostile[i % len(hostile)])
    golds = [gold_entries[task][0]["answer"] for task in batch_tasks]
    metadatas = [gold_entries[task][0]["metadata"] for task in batch_tasks]
    rejected_before = verifier.stats.rejected_by_grammar
    started = time.perf_counter()
    rewards = verifier.score(batch_tasks, answers, golds, metadatas)
    elapsed = time.perf_counter() - started
    print(f"\n10,000 hostile answers scored in {elapsed:.2f} s "
          f"({verifier.stats.rejected_by_grammar - rejected_before} rejected by grammar)")
    assert rewards == [0.0] * 10_000
    assert verifier.stats.rejected_by_grammar - rejected_before == 10_000 - 13 * len(tasks)
    assert not marker.exists()
    assert elapsed < 30


def test_module_level_scoring_function(gold_entries):
    countdown = gold_entries["countdown"][0]
    assert score_answers(["countdown"], [countdown["answer"]], [countdown["answer"]], [countdown["metadata"]]) == [1.0]


# ------------------------------------------------------------------ the sandbox
def test_forged_result_lines_change_no_score(probe, capfd):
    tasks = ["one", "forge", "zero", "one", "forge", "zero", "zero"]
    forged_before = probe.stats.forged_replies
    assert probe._run_scorers(tasks, ["1"] * len(tasks), [{}] * len(tasks)) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert probe.stats.forged_replies - forged_before >= 2 * 199  # written on the result pipe, and discarded
    output = capfd.readouterr()
    assert '"score": 1.0' not in output.out + output.err  # a scorer's stdout/stderr never reach the caller


def test_the_worker_has_an_empty_environment_and_a_fresh_empty_workdir(probe):
    assert os.environ  # the caller's environment is not empty, so the check below means something
    entries = [{"metadata": {"environ": {}}}, {"metadata": {"environ": dict(os.environ)}},
               {"metadata": {"cwd": probe.workdir}}, {"metadata": {"cwd": os.getcwd()}}]
    tasks = ["environment_is", "environment_is", "workdir_is", "workdir_is"]
    assert probe._run_scorers(tasks, ["0"] * 4, entries) == [1.0, 0.0, 1.0, 0.0]
    assert os.path.basename(probe.workdir).startswith("pilot-verifier-")


def test_the_worker_cannot_take_more_memory_than_its_limit(probe):
    entries = [{"metadata": {"megabytes": 16}}, {"metadata": {"megabytes": 2 * probe.memory_limit_mb}}]
    assert probe._run_scorers(["allocate", "allocate"], ["0", "0"], entries) == [1.0, 0.0]


def test_the_worker_cannot_write_files_run_commands_or_fork(probe, tmp_path):
    probe._run_scorers(["one"], ["1"], [{}])
    checks = [("write_file", tmp_path / "written", ("landlock",)),
              ("run_command", tmp_path / "touched", ("seccomp", "landlock")),
              ("fork", None, ("seccomp",))]
    for task, path, layers in checks:
        if not _layer_holds(probe, *layers):
            continue
        entry = {"metadata": {"path": str(path)}}
        assert probe._run_scorers([task], ["0"], [entry]) == [0.0], task
        assert path is None or not path.exists(), task
    assert _layer_holds(probe, "landlock", "seccomp"), f"no layer holds on this machine: {probe.sandbox}"


def test_the_worker_cannot_reach_the_network_or_signal_its_parent(probe):
    probe._run_scorers(["one"], ["1"], [{}])
    if not _layer_holds(probe, "network", "landlock", "seccomp"):
        pytest.skip(f"no network isolation holds here: {probe.sandbox}")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        assert probe._run_scorers(["connect"], ["0"], [{"metadata": {"port": port}}]) == [0.0]
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected
    if _layer_holds(probe, "seccomp") or "signals" in probe.sandbox["landlock"]:
        assert probe._run_scorers(["signal_parent"], ["0"], [{}]) == [0.0]


def test_cpu_bombs_cost_about_the_time_limit_each_and_are_counted():
    impatient = Verifier(timeout_s=0.5, scorer_module=PROBES)
    try:
        assert impatient._run_scorers(["one"], ["1"], [{}]) == [1.0]  # the zygote is up
        started = time.perf_counter()
        scores = impatient._run_scorers(["spin"] * 6 + ["one"], ["0"] * 7, [{}] * 7)
        elapsed = time.perf_counter() - started
        print(f"\n6 CPU bombs at a 0.5 s limit took {elapsed:.2f} s")
        assert scores == [0.0] * 6 + [1.0]
        assert impatient.stats.timeouts == 6 and impatient.stats.worker_restarts == 6
        assert elapsed < 6 * 0.5 + 3
    finally:
        impatient.close()


def test_the_cpu_rlimit_ends_a_spinning_scorer_before_the_wall_clock():
    patient = Verifier(timeout_s=30.0, cpu_limit_s=1, scorer_module=PROBES)
    try:
        started = time.perf_counter()
        assert patient._run_scorers(["spin", "one"], ["0", "1"], [{}, {}]) == [0.0, 1.0]
        assert time.perf_counter() - started < 15
        assert patient.stats.timeouts == 0 and patient.stats.worker_restarts == 1
    finally:
        patient.close()


def test_a_worker_near_its_cpu_budget_retires_without_losing_an_answer():
    frugal = Verifier(timeout_s=10.0, cpu_limit_s=2, worker_cpu_budget_s=3, scorer_module=PROBES)
    try:
        tasks, entries = ["one", "burn", "one"], [{}, {"metadata": {"cpu_s": 1.2}}, {}]
        assert frugal._run_scorers(tasks, ["1"] * 3, entries) == [1.0, 1.0, 1.0]
        assert frugal.stats.worker_restarts == 1 and frugal.stats.timeouts == 0
    finally:
        frugal.close()


def test_close_stops_every_process_and_removes_the_workdir():
    v = Verifier(scorer_module=PROBES)
    assert v._run_scorers(["one"], ["1"], [{}]) == [1.0]
    workdir, zygote, worker = v.workdir, v._zygote, v._worker.pid
    v.close()
    assert not os.path.exists(workdir)
    assert zygote.poll() is not None
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ tasks without a grammar
def test_a_task_without_a_grammar_is_refused_by_data_validation():
    with pytest.raises(ParameterError, match="'sudoku' is a reasoning-gym task with no answer grammar"):
        validate(DataParams, {"tasks": [{"name": "sudoku", "size": 10}]}, "data")
    with pytest.raises(ValueError, match="no answer grammar"):
        check_task_name("sudoku")
    with pytest.raises(ValueError, match="no answer grammar"):
        check_scorable("sudoku")
    with pytest.raises(ValueError, match="no answer grammar"):
        Verifier().score(["sudoku"], ["1"], ["1"], [{}])
    # A task with a grammar passes this check; it may still lack a renderer for the data pipeline.
    check_scorable("countdown")
    with pytest.raises(ValueError, match="can render compactly with an oracle plan(.|\n)*prompt: original"):
        check_task_name("countdown")
    check_task_name("countdown", prompt="original")  # its original question text needs no renderer
