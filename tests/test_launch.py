"""The command line (launch.py through fire) and the launcher: overrides, --dry_run, --save_dir, errors,
the MPI re-launch command and the ranks' entry point, aborting the job on one rank's sys.exit, sweeps run one
after another or in parallel, the --mpi default, and joining an outer mpiexec job."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lm_human_preferences import experiments, launcher
from lm_human_preferences.command_line import prepare_argv
from lm_human_preferences.utils import mpi

from mpi_programs import launcher_text, run as run_mpi

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(filename):
    """A top-level script (launch.py, sample.py) as a module, without running its `__main__` block."""
    spec = importlib.util.spec_from_file_location(filename.replace(".py", "_cli"), os.path.join(REPO_ROOT, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_script("launch.py")


def run_cli(*argv, cwd=REPO_ROOT, env=None, timeout=120):
    """A real subprocess; stdout and stderr kept apart (TensorFlow logs to stderr)."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    full_env.pop("LMHP_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def dry_run(capsys, *argv):
    """launch.py's main in this process with --dry_run: the printed hyperparameters as a dict."""
    cli.main([*argv, "--dry_run"])
    return json.loads(capsys.readouterr().out)


def cli_error(capsys, *argv) -> str:
    """The one-line error launch.py exits with."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert isinstance(info.value.code, str), f"expected an error message, got exit code {info.value.code!r}"
    assert info.value.code.startswith("error: ")
    return info.value.code


# ----- real subprocesses (each imports TensorFlow: few of them) -----------------------------------------------

def test_dry_run_subprocess_prints_the_resolved_hparams_with_overrides(tmp_path):
    result = run_cli("launch.py", "train_policy", "descriptiveness", "x", "--dry_run", "--save_dir", str(tmp_path),
                     "--ppo.lr", "3e-6", "--rewards.adaptive_kl", "off", "--task.response_length", "10",
                     "--task.query_suffix", " TL;DR:", "--task.start_text", ".")
    assert result.returncode == 0, result.stderr[-3000:]
    hparams = json.loads(result.stdout)
    assert hparams["run"]["save_dir"] == os.path.join(str(tmp_path), "x")
    assert hparams["ppo"]["lr"] == 3e-6
    assert hparams["ppo"]["total_episodes"] == 1_000_000 and hparams["ppo"]["batch_size"] == 512
    assert hparams["rewards"]["adaptive_kl"] is None and hparams["rewards"]["kl_coef"] == 0.15
    for task in (hparams["task"], hparams["rewards"]["train_new_model"]["task"]):
        assert (task["response_length"], task["query_suffix"], task["start_text"]) == (10, " TL;DR:", ".")
    reward = hparams["rewards"]["train_new_model"]
    assert (reward["batch_size"], reward["lr"], reward["labels"]["num_train"]) == (32, 5e-5, 4_992)


def test_fast_subprocesses_unknown_experiment_and_listing():
    """Neither needs TensorFlow: the registry is checked before a training module is imported."""
    result = run_cli("launch.py", "train_policy", "nosuch", "x", "--dry_run")
    assert result.returncode != 0
    assert "unknown train_policy experiment 'nosuch'" in result.stderr
    assert ("known experiments: cnndm, demo, demo_online, descriptiveness, descriptiveness_seeds, sentiment, test, "
            "test_seeds, tldr") in result.stderr
    assert result.stdout == ""
    listing = run_cli("launch.py", "experiments")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == [
        "train_reward: cnndm, demo, descriptiveness, sentiment, test, test_seeds (sweep: 2 trials), tldr",
        "train_policy: cnndm, demo, demo_online, descriptiveness, descriptiveness_seeds (sweep: 3 trials), sentiment, "
        "test, test_seeds (sweep: 2 trials), tldr"]


def test_rank_entry_point_rejects_a_bad_value_clearly_from_any_directory(tmp_path):
    """`python -m lm_human_preferences.launcher COMMAND JSON`, with the environment the ranks get, started
    outside the repository; the hyperparameters are checked before anything runs."""
    hparams = experiments.resolve_hparams("train_reward", "test", "x", save_dir=str(tmp_path))
    argv, env = launcher.rank_command("train_reward", hparams, 2)
    data = json.loads(argv[-1])
    data["labels"]["num_train"] = "many"
    result = run_cli("-m", "lm_human_preferences.launcher", "train_reward", json.dumps(data), cwd=str(tmp_path),
                     env={"PYTHONPATH": env["PYTHONPATH"]})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: labels.num_train: got 'many', expected an integer"
    assert os.listdir(tmp_path) == []  # nothing was trained or written


# ----- the command line in this process -------------------------------------------------------------------------

def test_overrides_reach_the_launcher_as_typed_text(monkeypatch):
    """fire would evaluate values as Python literals; every value must arrive as the text typed."""
    calls = []
    monkeypatch.setattr(launcher, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    cli.main(["train_policy", "tldr", "7", "-m", "2", "--save_dir=2024", "--task.query_suffix", " TL;DR:",
              "--task.start_text", ".", "--task.query_prefix", '"quoted"', "--task.end_text", "1,2",
              "--task.policy.initial_model", "1e5", "--ppo.lr=3e-6", "--task.penalty_reward_value", "-3",
              "--rewards.train_new_model.normalize_before", "--ppo.whiten_rewards", "off", "--dry_run"])
    [(args, kwargs)] = calls
    assert args == ("train_policy", "tldr", "7")
    assert (kwargs["mpi"], kwargs["save_dir"], kwargs["dry_run"]) == (2, "2024", True)
    assert kwargs["overrides"] == {
        "task.query_suffix": " TL;DR:", "task.start_text": ".", "task.query_prefix": '"quoted"',
        "task.end_text": "1,2", "task.policy.initial_model": "1e5", "ppo.lr": "3e-6",
        "task.penalty_reward_value": "-3", "rewards.train_new_model.normalize_before": "true",
        "ppo.whiten_rewards": "off"}


def test_a_bare_hparam_flag_means_true_and_own_flags_keep_their_meaning(capsys):
    # fire alone read a bare `--normalize_before` as `--rmalize_before False` (its `--noX` syntax)
    hparams = dry_run(capsys, "train_reward", "test", "x", "--normalize_after", "off", "--normalize_before")
    assert (hparams["normalize_before"], hparams["normalize_after"]) == (True, False)
    hparams = dry_run(capsys, "train_reward", "test", "12", "-s", "/runs")
    assert hparams["run"]["save_dir"] == "/runs/12"


@pytest.mark.parametrize("argv, flag", [
    (["demo", "-n"], "-n needs a value (--name VALUE"),  # fire made the run's name True: a traceback
    (["demo", "--name", "--online"], "--name needs a value"),
    (["train_reward", "test", "x", "--mpi"], "--mpi needs a value"),
    (["export", "run", "out", "--scope"], "--scope needs a value"),
    (["plot", "run", "--band"], "--band needs a value"),
])
def test_a_bare_own_flag_that_takes_a_value_is_refused(capsys, tmp_path, monkeypatch, argv, flag):
    monkeypatch.chdir(tmp_path)
    assert flag in cli_error(capsys, *argv)
    assert os.listdir(tmp_path) == []


def test_the_demo_refuses_the_no_forms_of_the_training_flags_too(capsys):
    assert "the demo runs as one process, start to end, and takes no --dry_run" in \
        cli_error(capsys, "demo", "--nodry_run")


def test_save_dir_and_its_defaults(capsys, tmp_path):
    assert dry_run(capsys, "train_reward", "test", "r")["run"]["save_dir"] == "/tmp/save/train_reward/r"
    assert dry_run(capsys, "train_policy", "test", "p")["run"]["save_dir"] == "/tmp/save/train_policy/p"
    assert dry_run(capsys, "train_policy", "test", "p", "--save_dir", str(tmp_path))["run"]["save_dir"] == \
        os.path.join(str(tmp_path), "p")
    hparams = experiments.resolve_hparams("train_reward", "test", "r", save_dir="~/runs")
    assert hparams.run.save_dir == os.path.join(os.path.expanduser("~"), "runs", "r")
    explicit = experiments.resolve_hparams("train_reward", "test", "r", overrides={"run.save_dir": "/exact"})
    assert explicit.run.save_dir == "/exact"


def test_a_saved_reward_model_replaces_training_one(capsys):
    hparams = dry_run(capsys, "train_policy", "descriptiveness", "x", "--rewards.train_new_model", "off",
                      "--rewards.trained_model", "/some/path")
    assert hparams["rewards"]["trained_model"] == "/some/path"
    assert hparams["rewards"]["train_new_model"] is None


def test_task_overrides_reach_the_reward_model_unless_set_there(capsys):
    hparams = dry_run(capsys, "train_policy", "test", "x", "--task.response_length", "2")
    assert hparams["task"]["response_length"] == hparams["rewards"]["train_new_model"]["task"]["response_length"] == 2
    message = cli_error(capsys, "train_policy", "test", "x", "--rewards.train_new_model.task.response_length", "2")
    assert "task and the new reward model's task differ in task.response_length" in message


@pytest.mark.parametrize("argv, expected", [
    (["--ppo.lrr", "1"], "unknown hyperparameter 'ppo.lrr'; did you mean ppo.lr"),
    # a reward-training name given to a policy run: the full name that works there (the README's label hint)
    (["--labels.source", "OUTPUT.json"], "unknown hyperparameter 'labels.source' at this level; the full dotted "
                                         "name is rewards.train_new_model.labels.source: "
                                         "--rewards.train_new_model.labels.source VALUE"),
    (["--ppo.lr", "fast"], "ppo.lr: got 'fast', expected a number"),
    (["--task.response_length", "1.5"], "task.response_length: got '1.5', expected an integer"),
    (["--rewards.trained_model", "X"], "set exactly one of rewards.trained_model and rewards.train_new_model "
                                       "(to use a saved reward model: --rewards.train_new_model off "
                                       "--rewards.trained_model PATH)"),
    (["--mpi", "0"], "--mpi: got '0', expected a positive number of processes"),
    (["--mpi", "two"], "--mpi: got 'two', expected a positive number of processes"),
    (["--dry_run", "maybe"], "--dry_run: got 'maybe', expected true or false"),
])
def test_user_errors_exit_with_one_clear_line(capsys, argv, expected):
    message = cli_error(capsys, "train_policy", "descriptiveness", "x", "--dry_run", *argv)
    assert expected in message, message
    assert capsys.readouterr().out == ""  # nothing half-printed


def test_unknown_experiment_message_in_process(capsys):
    message = cli_error(capsys, "train_reward", "sentimnt", "x", "--dry_run")
    assert "unknown train_reward experiment 'sentimnt' (did you mean sentiment?)" in message


def test_help_shows_the_command_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "launch", lambda *args, **kwargs: pytest.fail("--help ran the command"))
    assert prepare_argv(cli.COMMANDS, ["train_policy", "test", "x", "--ppo.lr", "1", "--help"]) == \
        ["train_policy", "--", "--help"]
    with pytest.raises(SystemExit) as info:
        cli.main(["train_policy", "test", "x", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().err  # fire writes its help to stderr
    assert "launch.py train_policy EXPERIMENT NAME" in help_text and "--dry_run" in help_text
    assert "--trials_in_parallel" in help_text


def test_fire_flags_after_the_separator_are_left_alone():
    assert prepare_argv(cli.COMMANDS, ["train_reward", "test", "x", "--", "--trace"]) == \
        ["train_reward", "'test'", "'x'", "--", "--trace"]


# ----- launcher --------------------------------------------------------------------------------------------------

def test_mpi_relaunch_command_round_trips_the_hparams(monkeypatch, tmp_path):
    overrides = {"task.query_suffix": "\n\nTL;DR: 'q' \"x\"", "ppo.lr": "3e-6", "rewards.adaptive_kl": "off"}
    hparams = experiments.resolve_hparams("train_policy", "descriptiveness", "x", save_dir=str(tmp_path),
                                          overrides=overrides)
    argv, env = launcher.rank_command("train_policy", hparams, 2)
    assert argv[:-1] == mpi.mpiexec_command(2) + [sys.executable, "-m", "lm_human_preferences.launcher",
                                                  "train_policy"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT
    received = launcher.hparams_from_json("train_policy", argv[-1])
    assert received == hparams and received.task.query_suffix == "\n\nTL;DR: 'q' \"x\""

    # the preflight checks would fetch the 124M model's hparams.json (tests run offline); not this test's subject
    monkeypatch.setattr(launcher.preflight, "check", lambda *args, **kwargs: None)
    calls = []
    monkeypatch.setattr(launcher, "call_forwarding_stop_signals", lambda argv, env: calls.append(argv) or 0)
    [(trial, launched)] = launcher.launch("train_policy", "descriptiveness", "x", mpi=2, save_dir=str(tmp_path),
                                          overrides=overrides)
    assert (trial.descriptor, launched) == ("", hparams)
    assert calls == [argv]
    monkeypatch.setattr(launcher, "call_forwarding_stop_signals", lambda argv, env: 5)
    with pytest.raises(SystemExit) as info:  # a failed job fails launch.py with the job's exit code
        launcher.launch("train_policy", "descriptiveness", "x", mpi=2, save_dir=str(tmp_path), overrides=overrides)
    assert info.value.code == 5


def test_rank_entry_point_errors():
    with pytest.raises(ValueError, match=r"train_reward hyperparameters are not valid JSON \(Expecting"):
        launcher.hparams_from_json("train_reward", "{'lr': 1}")
    with pytest.raises(ValueError, match=r"unknown hyperparameter 'labels.num_trian'; did you mean labels.num_train"):
        launcher.hparams_from_json("train_reward", json.dumps({"labels": {"num_trian": 8}}))
    with pytest.raises(ValueError, match="unknown command 'train'; known commands: train_reward, train_policy"):
        launcher.hparams_from_json("train", "{}")
    with pytest.raises(SystemExit) as info:
        launcher.main(["train_reward"])
    assert info.value.code == launcher.USAGE
    with pytest.raises(SystemExit) as info:
        launcher.main(["train_reward", "[]"])
    assert info.value.code == "error: hyperparameters: expected a JSON object, got list"


def test_mpi_is_checked_before_a_dry_run():
    with pytest.raises(ValueError, match="--mpi: got 0, expected a positive number of processes"):
        launcher.launch("train_reward", "test", "x", mpi=0, dry_run=True)


def test_exit_in_a_single_process_is_an_ordinary_exit():
    with pytest.raises(SystemExit) as info:
        with launcher.abort_job_on_exit():
            sys.exit(3)
    assert info.value.code == 3


def test_sys_exit_on_one_rank_ends_the_whole_job():
    start = time.time()
    result = run_mpi(2, "exit_on_rank1.py", timeout=90)
    elapsed = time.time() - start
    assert result.returncode == 3, result.stdout[-3000:]
    assert "[rank 1 of 2] exited with code 3; aborting the job" in result.stdout
    assert "rank 0 got past the barrier" not in result.stdout
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end"


# ----- sweeps ------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_gpus(monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: [])


def test_dry_run_of_a_sweep_lists_every_trial(capsys, tmp_path, no_gpus):
    cli.main(["train_policy", "descriptiveness_seeds", "s", "--save_dir", str(tmp_path), "--ppo.lr", "3e-6",
              "--dry_run"])
    captured = capsys.readouterr()
    listing = json.loads(captured.out)
    assert [trial["descriptor"] for trial in listing] == ["seed1", "seed2", "seed3"]
    assert [trial["swept"] for trial in listing] == [{"run.seed": 1}, {"run.seed": 2}, {"run.seed": 3}]
    for seed, trial in zip([1, 2, 3], listing):
        assert trial["save_dir"] == trial["hparams"]["run"]["save_dir"] == str(tmp_path / "s" / f"seed{seed}")
        assert trial["hparams"]["run"]["seed"] == seed
        assert trial["hparams"]["ppo"]["lr"] == 3e-6  # overrides reach every trial
    assert captured.err.strip() == "--mpi not given: 1 rank (no GPU found)"  # stdout stays pure JSON
    # overriding the swept name leaves one trial, printed and saved as a plain experiment
    single = dry_run(capsys, "train_policy", "descriptiveness_seeds", "s", "--save_dir", str(tmp_path),
                     "--run.seed", "9")
    assert (single["run"]["seed"], single["run"]["save_dir"]) == (9, str(tmp_path / "s"))


def trained_seed(run_dir):
    with open(os.path.join(run_dir, "train_reward_hparams.json")) as f:
        return json.load(f)["run"]["seed"]


def test_a_sweep_runs_its_trials_one_after_another(capsys, tmp_path, no_gpus):
    cli.main(["train_reward", "test_seeds", "sweep", "--save_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.index("trial 1 of 2: seed1 -> ") < out.index("trial 2 of 2: seed2 -> ")
    assert sorted(os.listdir(tmp_path / "sweep")) == ["seed1", "seed2"]
    for seed in (1, 2):
        run_dir = tmp_path / "sweep" / f"seed{seed}"
        assert os.path.exists(run_dir / "reward_model" / "checkpoints" / "checkpoint")
        assert trained_seed(run_dir) == seed


def test_trials_in_parallel_run_as_subprocesses_one_gpu_each(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["3", "5"])  # ids as CUDA_VISIBLE_DEVICES lists them
    cli.main(["train_reward", "test_seeds", "par", "--save_dir", str(tmp_path), "--trials_in_parallel"])
    out = capsys.readouterr().out
    assert "--mpi not given: 1 rank per trial (--trials_in_parallel)" in out
    assert f"trial seed1 starting on GPU 3 -> {tmp_path / 'par' / 'seed1'}" in out
    assert f"trial seed2 starting on GPU 5 -> {tmp_path / 'par' / 'seed2'}" in out
    for seed in (1, 2):  # each trial's lines come back prefixed with its descriptor
        run_dir = tmp_path / "par" / f"seed{seed}"
        assert f"[seed{seed}] saved the reward model to {run_dir / 'reward_model'}" in out
        assert os.path.exists(run_dir / "reward_model" / "checkpoints" / "checkpoint")
        assert trained_seed(run_dir) == seed
    assert out.rstrip().endswith("all 2 trials finished")


def test_parallel_trials_all_run_and_failures_are_reported(capsys, monkeypatch):
    """Trial 2 of 3 fails at once: the others still run to their end, and the launch fails naming it."""
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["0", "1"])
    program = ("import os, sys, time; seed = {seed}; time.sleep(0.5 * seed); "
               "print('on', os.environ['CUDA_VISIBLE_DEVICES'], 'pythonpath', os.environ['PYTHONPATH']); "
               "sys.exit(3 if seed == 2 else 0)")
    monkeypatch.setattr(launcher, "rank_argv", lambda command, hparams, resume: [
        sys.executable, "-c", program.format(seed=hparams.run.seed)])
    trials = experiments.resolve_trials("train_policy", "descriptiveness_seeds", "x")
    with pytest.raises(SystemExit) as info:
        launcher.run_in_parallel("train_policy", trials)
    assert info.value.code == "error: 1 of 3 trials failed: seed2 (exit code 3)"
    out = capsys.readouterr().out
    for descriptor, gpu in [("seed1", "0"), ("seed2", "1"), ("seed3", "0")]:  # round-robin over the GPUs
        assert f"[{descriptor}] on {gpu} pythonpath {REPO_ROOT}" in out


def test_a_stop_signal_reaches_every_parallel_trial(capsys, monkeypatch, no_gpus):
    """SIGTERM to the launcher (a scheduler ending the job) reaches each trial as SIGUSR1, the trainers' signal
    to stop with their state saved; the trials are in sessions of their own, so it arrives once."""
    program = ("import signal, sys, time; "
               "signal.signal(signal.SIGUSR1, lambda *_: (print('stopping', flush=True), sys.exit(75))); "
               "print('ready', flush=True); time.sleep(60)")
    monkeypatch.setattr(launcher, "rank_argv", lambda command, hparams, resume: [sys.executable, "-c", program])
    trials = experiments.resolve_trials("train_reward", "test_seeds", "x")
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(SystemExit) as info:
            launcher.run_in_parallel("train_reward", trials)
    finally:
        timer.cancel()
    assert info.value.code == "error: 2 of 2 trials failed: seed1 (exit code 75), seed2 (exit code 75)"
    out = capsys.readouterr().out
    assert "[seed1] stopping" in out and "[seed2] stopping" in out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the launcher's handlers are gone again


@pytest.mark.parametrize("argv, expected", [
    (["--trials_in_parallel", "--mpi", "2"], "--trials_in_parallel runs each trial as a single process (one GPU "
                                             "each) and cannot be combined with --mpi 2"),
    (["--trials_in_parallel", "maybe"], "--trials_in_parallel: got 'maybe', expected true or false"),
])
def test_trials_in_parallel_errors(capsys, argv, expected):
    message = cli_error(capsys, "train_reward", "test_seeds", "x", "--dry_run", *argv)
    assert expected in message, message


def test_trials_in_parallel_is_a_bare_flag_with_a_short_form():
    assert prepare_argv(cli.COMMANDS, ["train_reward", "test_seeds", "x", "-t", "--lr", "1"]) == \
        ["train_reward", "'test_seeds'", "'x'", "--trials_in_parallel", "--lr", "'1'"]


# ----- how many ranks -------------------------------------------------------------------------------------------

def test_mpi_defaults_to_one_rank_per_visible_gpu(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert launcher.plan_ranks(None) == launcher.RankPlan(4, False, "--mpi not given: 4 ranks (one per visible GPU)")
    assert launcher.plan_ranks(2) == launcher.RankPlan(2, False, None)  # --mpi N overrides
    calls = []
    monkeypatch.setattr(launcher, "call_forwarding_stop_signals", lambda argv, env: calls.append(argv) or 0)
    cli.main(["train_reward", "test", "x", "--save_dir", str(tmp_path)])
    [argv] = calls
    assert argv[:len(mpi.mpiexec_command(4))] == mpi.mpiexec_command(4)
    assert capsys.readouterr().out.splitlines()[0] == "--mpi not given: 4 ranks (one per visible GPU)"
    monkeypatch.setattr(launcher, "visible_gpus", lambda: ["7"])
    assert launcher.plan_ranks(None).note == "--mpi not given: 1 rank (one per visible GPU)"


def test_mpi_defaults_to_one_rank_without_gpus(capsys, no_gpus):
    assert launcher.plan_ranks(None) == launcher.RankPlan(1, False, "--mpi not given: 1 rank (no GPU found)")
    dry_run(capsys, "train_reward", "test", "x")
    cli.main(["train_reward", "test", "x", "--dry_run", "--mpi", "1"])
    assert capsys.readouterr().err == ""  # an explicit --mpi needs no note


def fake_nvidia_smi(directory, gpus):
    """An `nvidia-smi` that lists `gpus` GPUs (each with a MIG line, which is no extra GPU)."""
    script = directory / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n  MIG 1g.10gb Device 0: (UUID: MIG-{i})\\n"
                    for i in range(gpus))
    script.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] && printf '{lines}'\n")
    script.chmod(0o755)
    return str(directory)


def test_visible_gpus_without_tensorflow(monkeypatch, tmp_path):
    for listed, expected in [("0,2", ["0", "2"]), ("", []), ("-1", []), ("1,-1,2", ["1"]),
                             ("GPU-abc", ["GPU-abc"])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
        assert launcher.visible_gpus() == expected, listed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 3))
    assert launcher.visible_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no nvidia-smi: no NVIDIA driver
    assert launcher.visible_gpus() == []


def test_inside_an_outer_mpi_job_no_ranks_are_started(monkeypatch, capsys):
    """What an outer launcher's environment means (the job itself: the next test); checked before MPI starts."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setattr(launcher, "visible_gpus", lambda: pytest.fail("GPUs counted inside an outer MPI job"))
    assert launcher.plan_ranks(None) == launcher.RankPlan(2, True, "--mpi not given: joining the outer MPI job of "
                                                                   "2 ranks")
    assert launcher.plan_ranks(2) == launcher.RankPlan(2, True, None)
    message = cli_error(capsys, "train_reward", "test", "x", "--mpi", "3")
    assert message.startswith("error: --mpi 3 disagrees with the outer MPI job of 2 ranks that started this "
                              "launch.py (it joins that job and starts no ranks of its own); drop --mpi, or start "
                              "the job with 3 ranks"), message
    message = cli_error(capsys, "train_reward", "test_seeds", "x", "--trials_in_parallel")
    assert "--trials_in_parallel starts one process per trial, but this launch.py is one of 2 ranks started by an " \
           "outer MPI launcher" in message


@pytest.mark.parametrize("mpi_flag", [[], ["--mpi", "2"]], ids=["default", "agreeing_mpi"])
def test_under_an_outer_mpiexec_each_process_is_one_rank(tmp_path, mpi_flag):
    """`mpiexec -n 2 launch.py train_reward test NAME [--mpi 2]`, on a machine that seems to have 4 GPUs: the two
    processes are the job's two ranks; nothing is started inside it and the reward model is written once."""
    fake_gpus = fake_nvidia_smi(tmp_path, 4)
    env = {"PATH": fake_gpus + os.pathsep + os.environ["PATH"]}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        result = run_mpi(2, os.path.join(REPO_ROOT, "launch.py"), "train_reward", "test", "outer",
                         "--save_dir", tmp_path / "save", *mpi_flag, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    # rank 0 speaks for the job
    assert out.count("--mpi not given: joining the outer MPI job of 2 ranks") == (0 if mpi_flag else 1)
    assert out.count("reward_model parameters identical on all 2 ranks") == 1
    assert out.count("saved the reward model to") == 1
    assert os.listdir(tmp_path / "save") == ["outer"]
    assert os.path.exists(tmp_path / "save" / "outer" / "reward_model" / "checkpoints" / "checkpoint")


# ----- a user error under MPI: one line, once --------------------------------------------------------------------

def bad_best_of_4_labels(path, count=16):
    """`count` records of the test task (query 3, response 4 tokens) whose `best` is out of range: the file passes
    the checks made before the ranks start (it holds enough records), and each rank fails reading it."""
    record = {"query": [1, 2, 3], **{f"sample{i}": [1, 2, 3, 4] for i in range(4)}, "best": 7}
    with open(path, "w") as f:
        json.dump([record] * count, f)
    return str(path)


def test_a_user_error_in_the_ranks_of_mpi_2_prints_one_line_once(tmp_path):
    labels = bad_best_of_4_labels(tmp_path / "labels.json")
    result = run_cli("launch.py", "train_reward", "test", "x", "--mpi", "2", "--save_dir", str(tmp_path),
                     "--labels.source", labels, timeout=300)
    assert result.returncode == 1
    assert result.stderr == f"error: {labels}, record 0, field 'best': 7 is out of range [0, 4)\n"  # no banners


def test_under_an_outer_mpiexec_a_user_error_is_said_once_by_rank_0(tmp_path):
    result = run_mpi(2, os.path.join(REPO_ROOT, "launch.py"), "train_reward", "test", "x", "--save_dir",
                     tmp_path, "--rollout_batch_size", "3", timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == ["error: rollout_batch_size=3 must be divisible by the number of MPI ranks (2)"], result.stdout


def test_under_an_outer_mpiexec_an_error_of_one_rank_alone_ends_the_job(tmp_path):
    """Rank 1 alone cannot read its label file (as on a host the save directory is not shared with): it says so,
    naming its rank, and the job ends, instead of rank 0 waiting for it forever."""
    launch = [sys.executable, os.path.join(REPO_ROOT, "launch.py"), "train_reward", "test", "x",
              "--save_dir", str(tmp_path / "save")]
    missing = tmp_path / "elsewhere" / "labels.json"
    argv = mpi.mpiexec_command(1) + launch + [":", "-n", "1"] + launch + ["--labels.source", str(missing)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT)
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=240)
    assert result.returncode != 0
    errors = [line for line in launcher_text(result.stdout).splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("[rank 1 of 2] error: ") and str(missing) in errors[0], \
        result.stdout[-3000:]
    assert time.monotonic() - started < 200


def test_relaying_the_ranks_stderr_drops_repeats_and_open_mpi_failure_banners():
    import io
    dashes = "-" * 74 + "\n"
    stream = io.StringIO(
        "error: bad label\n(set LMHP_TRACEBACK=1 to see where it was raised)\n"
        "error: bad label\n(set LMHP_TRACEBACK=1 to see where it was raised)\n"
        f"\0{dashes}MPI_ABORT was invoked on rank 0 in communicator MPI_COMM_WORLD\n  Errorcode: 1\n{dashes}"
        f"{dashes}prterun has exited due to process rank 1 with PID 0 on node vm calling\n\"abort\". This may\n"
        f"{dashes}"
        "a warning of ours\n"
        f"{dashes}An unrecognized option was included on the mpiexec command line\n{dashes}"
        "error: another error\n")
    out = io.StringIO()
    launcher.relay_rank_stderr(stream, out)
    assert out.getvalue() == (
        "error: bad label\n(set LMHP_TRACEBACK=1 to see where it was raised)\n"
        "a warning of ours\n"
        f"{dashes}An unrecognized option was included on the mpiexec command line\n{dashes}"  # not a failure banner
        "error: another error\n")


@pytest.mark.parametrize("flag", ["--mpi", "--dry_run", "--resume"])
def test_the_demo_says_it_runs_as_one_process(capsys, flag):
    message = cli_error(capsys, "demo", "x", flag, "2")
    assert message.startswith(f"error: {flag}: the demo runs as one process, start to end, and takes no {flag}; "
                              f"its steps run alone as ./launch.py train_reward demo NAME and ./launch.py "
                              f"train_policy demo NAME, which take {flag}"), message
    assert "unknown hyperparameter" not in message


def test_a_reader_that_stops_early_gets_no_traceback():
    """`./launch.py ... --dry_run | head -1`: the pipe closes before the hyperparameters are written."""
    process = subprocess.Popen([sys.executable, "launch.py", "train_policy", "descriptiveness_seeds", "x", "--dry_run"],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_a_gs_save_directory_that_holds_a_run_is_refused_and_a_sibling_with_a_longer_name_is_not(gcs_bucket):
    from google.cloud import storage
    hparams = experiments.resolve_hparams("train_reward", "test", "myrun", save_dir=f"{gcs_bucket}/runs")
    assert hparams.run.save_dir == f"{gcs_bucket}/runs/myrun"
    bucket = storage.Client(project=None).bucket(gcs_bucket[len("gs://"):])
    bucket.blob("runs/myrun2/train_reward_hparams.json").upload_from_string(b"{}")  # another run: not this one
    launcher.check_run_directory("train_reward", hparams, resume=False)
    bucket.blob("runs/myrun/train_reward_hparams.json").upload_from_string(b"{}")
    with pytest.raises(ValueError, match=f"^{hparams.run.save_dir} already holds a run, and a run is never "
                                         "overwritten: continue it with the same command and --resume"):
        launcher.check_run_directory("train_reward", hparams, resume=False)
