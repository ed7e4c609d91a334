"""What the commands do before any work, as real subprocesses of the command lines the README shows: --help and
--dry_run load no TensorFlow (the hyperparameters live in lm_human_preferences/hparams.py), a policy run's dry run
shows where its reward model goes and the run puts it there, each command's short flags are its own, and the
`tensorboard` the README points at is installed and reads our logs."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
import requests

from lm_human_preferences.command_line import prepare_argv, short_flags
from lm_human_preferences.utils import stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TensorFlow's C++ start-up lines (glog's format, absl's notice, the CPU-feature notice)
TF_STARTUP_LINE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} [\d:.]+ +\d+ \S+\]"
                             r"|To enable the following instructions)", re.M)


def run(*argv, timeout=600, python_flags=(), cwd=REPO_ROOT):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    env.pop("LMHP_TRACEBACK", None)
    return subprocess.run([sys.executable, *python_flags, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def load_launch_py():
    spec = importlib.util.spec_from_file_location("launch_startup_cli", os.path.join(REPO_ROOT, "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- --help and --dry_run import no TensorFlow -------------------------------------------------------------------

@pytest.mark.parametrize("argv, shows", [
    (["launch.py", "--help"], "SYNOPSIS"),
    (["launch.py", "train_reward", "--help"], "SYNOPSIS"),
    (["launch.py", "train_reward", "test", "x", "--dry_run"], '"labels": {'),
    (["launch.py", "train_policy", "test", "x", "--dry_run"], '"train_new_model": {'),
    (["launch.py", "train_policy", "test_seeds", "x", "-d", "--ppo.lr", "1e-5"], '"descriptor": "seed1"'),
    (["sample.py", "--help"], "SYNOPSIS"),
    (["bench.py", "--help"], "SYNOPSIS"),
])
def test_help_and_dry_run_import_no_tensorflow(argv, shows, tmp_path):
    if "-d" in argv or "--dry_run" in argv:
        argv = argv + ["--save_dir", str(tmp_path)]
    result = run(*argv, python_flags=["-X", "importtime"])  # every imported module, on stderr
    assert result.returncode == 0, result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "lm_human_preferences" in imported and "fire" in imported  # the listing is complete
    assert not [name for name in imported if name.split(".")[0] in ("tensorflow", "keras")], \
        f"{' '.join(argv)} imported TensorFlow"
    output = result.stdout + "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert shows in output
    assert not TF_STARTUP_LINE.search(output), output[-2000:]
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


# ----- a policy run's reward model: shown by --dry_run where the run saves it ----------------------------------------

@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    """One real `./launch.py train_policy test x` (its reward model trained first), and its dry run before it."""
    save_dir = str(tmp_path_factory.mktemp("save"))
    dry = run("launch.py", "train_policy", "test", "x", "--save_dir", save_dir, "--dry_run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    done = run("launch.py", "train_policy", "test", "x", "--save_dir", save_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return os.path.join(save_dir, "x"), json.loads(dry.stdout)


def test_dry_run_shows_where_the_reward_model_goes_and_the_run_saves_it_there(policy_run):
    run_dir, dry = policy_run
    # a train_reward run saves its model in RUN.SAVE_DIR/reward_model; the one trained first is the policy run's own
    assert dry["rewards"]["train_new_model"]["run"]["save_dir"] == dry["run"]["save_dir"] == run_dir
    with open(os.path.join(run_dir, "train_policy_hparams.json")) as saved:
        recorded = json.load(saved)
    assert recorded["rewards"]["train_new_model"]["run"]["save_dir"] == run_dir
    assert recorded["rewards"]["trained_model"] == os.path.join(run_dir, "reward_model")
    assert os.path.isfile(os.path.join(run_dir, "reward_model", "checkpoints", "checkpoint"))


def test_a_sweeps_dry_run_shows_each_trials_reward_model_directory(tmp_path):
    result = run("launch.py", "train_policy", "test_seeds", "x", "--save_dir", str(tmp_path), "--dry_run")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = json.loads(result.stdout)
    assert [trial["descriptor"] for trial in trials] == ["seed1", "seed2"]
    for trial in trials:
        assert trial["hparams"]["rewards"]["train_new_model"]["run"]["save_dir"] == trial["save_dir"] == \
            os.path.join(str(tmp_path), "x", trial["descriptor"])


def test_another_reward_model_directory_is_refused_naming_save_dir(tmp_path):
    result = run("launch.py", "train_policy", "test", "x", "--save_dir", str(tmp_path / "runs"),
                 "--rewards.train_new_model.run.save_dir", str(tmp_path / "elsewhere"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == (
        f"error: rewards.train_new_model.run.save_dir={str(tmp_path / 'elsewhere')!r}: the reward model a policy run "
        f"trains first is saved in the run's own directory, as SAVE_DIR/reward_model "
        f"(run.save_dir={str(tmp_path / 'runs' / 'x')!r}); choose the directory with --save_dir (or --run.save_dir), "
        f"and leave rewards.train_new_model.run.save_dir unset")
    assert os.listdir(tmp_path) == []  # refused before anything was written


# ----- short flags: each command's own ---------------------------------------------------------------------------

def test_each_commands_short_flags_are_those_its_help_lists():
    commands = load_launch_py().COMMANDS
    assert prepare_argv(commands, ["train_policy", "test", "x", "-s", "/runs", "-m", "2", "-d", "-t", "-r"]) == \
        ["train_policy", "'test'", "'x'", "--save_dir", "'/runs'", "--mpi", "'2'", "--dry_run", "--trials_in_parallel",
         "--resume"]
    assert prepare_argv(commands, ["label", "test", "out.json", "--count", "8", "--judge", "vowels", "-s", "3",
                                   "-l", "best_of_2"]) == \
        ["label", "'test'", "'out.json'", "--count", "'8'", "--judge", "'vowels'", "--seed", "'3'", "--label_type",
         "'best_of_2'"]
    assert prepare_argv(commands, ["export", "RUN", "OUT", "-s", "reward_model"]) == \
        ["export", "'RUN'", "'OUT'", "--scope", "'reward_model'"]
    assert prepare_argv(commands, ["demo", "-n", "mine", "-s", "/runs"]) == \
        ["demo", "--name", "'mine'", "--save_dir", "'/runs'"]
    # label's -t could be --temperature or --token, -p --policy or --port: none (as its --help shows), and -h is help
    assert prepare_argv(commands, ["label", "test", "o.json", "-t", "0.1"]) == \
        ["label", "'test'", "'o.json'", "-t", "'0.1'"]
    assert prepare_argv(commands, ["label", "-h"]) == ["label", "--", "--help"]
    for command in ("train_reward", "train_policy", "demo", "label", "export"):
        shown = run("launch.py", command, "--help")
        help_text = shown.stdout + shown.stderr
        listed = dict(re.findall(r"^ +(-\w), (--\w+)=", help_text, re.M))
        assert {short: long for short, long in short_flags(commands[command]).items()} == \
            {short: long for short, long in listed.items() if short != "-h"}, command


def test_export_dash_s_is_its_scope(policy_run, tmp_path):
    run_dir, _ = policy_run
    result = run("launch.py", "export", run_dir, str(tmp_path / "out"), "-s", "reward_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"exported reward_model of {run_dir} to {tmp_path / 'out'}"
    assert os.path.isfile(tmp_path / "out" / "reward_head.safetensors")


def test_label_dash_s_is_its_seed(tmp_path):
    outputs = {}
    for name, seed_flags in (("short", ["-s", "3"]), ("long", ["--seed", "3"]), ("other", ["--seed", "4"])):
        output = tmp_path / f"{name}.json"
        result = run("launch.py", "label", "test", str(output), "--count", "8", "--judge", "letter_e", *seed_flags)
        assert result.returncode == 0, result.stderr[-3000:]
        # sampling runs TensorFlow: still none of its notices (oneDNN's int32 fallback among them)
        assert not TF_STARTUP_LINE.search(result.stderr), result.stderr
        outputs[name] = output.read_text()
    assert outputs["short"] == outputs["long"] != outputs["other"]


# ----- tensorboard, the viewer of the runs' logs --------------------------------------------------------------

def test_tensorboard_is_installed_and_serves_the_scalars_our_runs_log(tmp_path):
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    version = subprocess.run([tensorboard, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version.stdout.strip()), version.stdout

    with stats.StatsLogger(str(tmp_path / "tb" / "ppo"), enabled=True) as logger:  # as train_policy logs
        logger.write(0, {"objective/score": 0.25})
        logger.write(1, {"objective/score": 0.75})
    server = subprocess.Popen([tensorboard, "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline, lines = None, time.time() + 120, []
        while url is None and time.time() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = found and found.group(1)
        assert url, "".join(lines)
        runs = []
        while not runs and time.time() < deadline:  # it loads the logs in the background
            runs = requests.get(f"{url}/data/runs", timeout=30).json()
            time.sleep(0 if runs else 0.5)
        assert runs == ["ppo"]
        points = requests.get(f"{url}/data/plugin/scalars/scalars", params={"run": "ppo", "tag": "objective/score"},
                              timeout=30).json()
        assert [(step, value) for _, step, value in points] == [(0, 0.25), (1, 0.75)]
    finally:
        server.terminate()
        server.wait(timeout=30)
