#!/usr/bin/env python3
"""Train reward models and policies from human preferences.

    ./launch.py train_reward EXPERIMENT NAME [--mpi N] [--save_dir DIR] [--dry_run] [--trials_in_parallel]
                                             [--resume] [--some.hparam VALUE ...]
    ./launch.py train_policy EXPERIMENT NAME [--mpi N] [--save_dir DIR] [--dry_run] [--trials_in_parallel]
                                             [--resume] [--some.hparam VALUE ...]
    ./launch.py demo [NAME] [--save_dir DIR] [--online] [--some.hparam VALUE ...]   the offline demo, with a report
    ./launch.py label EXPERIMENT OUTPUT.json --count N --judge letter_e [--temperature T] [--label_type best_of_4]
                                             [--policy SAVE_DIR]
    ./launch.py label EXPERIMENT OUTPUT.json --count N --judge human [--port 8000] [--host 127.0.0.1]
                      [--token T] [--overlap 0.1] [--instructions FILE] [--policy SAVE_DIR]   people label in a web page
    ./launch.py score REWARD_MODEL_DIR --query TEXT --response TEXT [--truncate]   the reward of a response
    ./launch.py score REWARD_MODEL_DIR --input IN.jsonl [--output OUT.jsonl] [--truncate]   rewards of records
    ./launch.py labels_from_text SOURCE IN.jsonl OUT.json [--label_type TYPE] [--truncate] [--some.hparam VALUE ...]
                                     a label file from text comparisons (SOURCE: experiment or run directory)
    ./launch.py experiments          list the registered experiments, and which are sweeps
    ./launch.py export SAVE_DIR OUT_DIR [--scope policy|reward_model]   a saved model as a Hugging Face GPT-2 directory
    ./launch.py plot RUN_DIR [RUN_DIR ...] [--output FILE.png] [--force] [--band std|minmax]
                                     learning curves of runs (a sweep's seeds) in one figure; default ./plot.png

Outputs go to SAVE_DIR/NAME (default /tmp/save/train_reward or /tmp/save/train_policy). An experiment that is
a sweep (e.g. descriptiveness_seeds: run.seed 1, 2, 3) is several trials, each saved to
SAVE_DIR/NAME/DESCRIPTOR (seed1, seed2, ...); they run one after another, or all at once, one process and
one GPU each, with --trials_in_parallel. Overrides apply to every trial; overriding a swept hyperparameter
leaves that one value.

`--dry_run` prints every hyperparameter with its resolved value (for a sweep, every trial's). A
hyperparameter flag without a value means true (`--normalize_before`); optional groups take on/off
(`--rewards.adaptive_kl off`).

An existing run is never overwritten: `--resume` continues it where it stopped, with the same hyperparameters.
SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stops a run cleanly after the current step with its state saved (exit
status 75); the same command with `--resume` continues it exactly.

`--mpi N` runs each trial on N MPI ranks; without it, one rank per visible GPU (1 without GPUs). Started
by an outer launcher (`mpirun -np 8 ./launch.py ...`, srun), launch.py starts no ranks of its own: each
process runs its rank of the job.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # started by a Python without the dependencies: re-run under .venv/bin/python
    from lm_human_preferences.utils.entry_points import ensure_project_python
    ensure_project_python(__file__)

import fire  # noqa: E402

from lm_human_preferences import experiments, launcher  # noqa: E402
from lm_human_preferences.command_line import mpi_ranks, prepare_argv, true_or_false  # noqa: E402
from lm_human_preferences.utils.entry_points import user_errors_in_one_line  # noqa: E402

# Each command below is a function whose signature is its command line: fire maps positional arguments and flags
# to its parameters (command_line.prepare_argv hands fire the quoted values), **overrides takes the
# hyperparameters, and the docstring is its --help.


def _launch_training(command, experiment, name, mpi, save_dir, dry_run, trials_in_parallel, resume, overrides):
    """What train_reward and train_policy share: their flags checked, then the launcher (each keeps its own
    signature and docstring, which fire shows as its --help)."""
    launcher.launch(command, experiment, name, mpi=mpi_ranks(mpi), save_dir=save_dir,
                    dry_run=true_or_false(dry_run, "dry_run"), resume=true_or_false(resume, "resume"),
                    trials_in_parallel=true_or_false(trials_in_parallel, "trials_in_parallel"), overrides=overrides)


# ----- commands --------------------------------------------------------------------------------------------------

def train_reward(experiment, name, mpi: int = None, save_dir: str = None, dry_run=False, trials_in_parallel=False,
                 resume=False, **overrides):  # the types are for --help, where fire shows Optional[int]
    """Train a reward model from preference labels.

    Saves to SAVE_DIR/NAME, or SAVE_DIR/NAME/DESCRIPTOR for each trial of a sweep. MPI: ranks per trial, default
    one per visible GPU (1 without). TRIALS_IN_PARALLEL: run a sweep's trials at once, one process and GPU each.
    RESUME: continue the run saved in SAVE_DIR/NAME (an existing run is never overwritten).
    """
    _launch_training("train_reward", experiment, name, mpi, save_dir, dry_run, trials_in_parallel, resume, overrides)


def train_policy(experiment, name, mpi: int = None, save_dir: str = None, dry_run=False, trials_in_parallel=False,
                 resume=False, **overrides):  # the types are for --help, where fire shows Optional[int]
    """Fine-tune a policy with PPO against a reward model (trained first, unless --rewards.trained_model).

    Saves to SAVE_DIR/NAME, or SAVE_DIR/NAME/DESCRIPTOR for each trial of a sweep. MPI: ranks per trial, default
    one per visible GPU (1 without). TRIALS_IN_PARALLEL: run a sweep's trials at once, one process and GPU each.
    RESUME: continue the run saved in SAVE_DIR/NAME (an existing run is never overwritten).
    """
    _launch_training("train_policy", experiment, name, mpi, save_dir, dry_run, trials_in_parallel, resume, overrides)


def demo(name="demo", save_dir="/tmp/save/demo", online=False, **overrides):
    """The offline demo: synthetic labels -> reward model -> PPO, then a report and learning curves. --online: the
    labels are collected from the current policy during PPO (experiment demo_online)."""
    for flag in ("mpi", "dry_run", "trials_in_parallel", "resume"):
        if flag in overrides or f"no{flag}" in overrides:  # not hyperparameters, and not the demo's flags
            raise ValueError(f"--{flag}: the demo runs as one process, start to end, and takes no --{flag}; its "
                             f"steps run alone as ./launch.py train_reward demo NAME and ./launch.py train_policy "
                             f"demo NAME, which take --{flag}")
    from lm_human_preferences.utils import devices
    tf = devices.import_tensorflow()  # before anything else imports it: without its start-up notices
    from lm_human_preferences import demo as demo_module
    experiment = "demo_online" if true_or_false(online, "online") else "demo"
    tf.compat.v1.disable_eager_execution()
    demo_module.run_demo(name, save_dir, overrides=overrides, experiment=experiment)


def label(experiment, output, count, judge, temperature: float = None, label_type: str = None, seed=0,
          policy: str = None, host: str = None, port: int = None, token: str = None, overlap: float = None,
          instructions: str = None, **overrides):
    """Write a label file: samples of a train_reward EXPERIMENT's initial policy (or of a saved --policy), chosen
    by a synthetic judge, or by people in a web page (--judge human).

    JUDGE: letter_X, vowels, or human. TEMPERATURE: a synthetic judge's noise. POLICY: a train_policy run
    directory to sample instead of the initial policy. Human only: HOST (default 127.0.0.1; another address needs
    a token), PORT (default 8000; 0 = any free port), TOKEN (generated off loopback when not given), OVERLAP
    (fraction of items labelled by two people, default 0), INSTRUCTIONS (a text file shown to labelers). The same
    command again resumes a stopped human labeling job.
    """
    from lm_human_preferences import labeler
    labeler.label_command(experiment, output, count=count, judge=judge, temperature=temperature,
                          label_type=label_type, seed=seed, policy=policy, host=host, port=port, token=token,
                          overlap=overlap, instructions=instructions, **overrides)


def score(reward_model_dir, query: str = None, response: str = None, input: str = None, output: str = None,
          truncate=False):
    """Print the reward a saved reward model gives a response to a query; or (--input IN.jsonl, one
    {"query": TEXT, "response": TEXT} a line) write each record with a "reward" field added, to --output OUT.jsonl (a
    new file) or to stdout.

    REWARD_MODEL_DIR: a train_reward or train_policy run directory, or a run's reward_model/ (the run's task settings
    apply). TRUNCATE: cut texts longer than the task's query_length / response_length tokens instead of refusing them.
    """
    from lm_human_preferences.utils import devices
    devices.import_tensorflow()  # before anything else imports it: without its start-up notices
    from lm_human_preferences import score as score_module
    score_module.score_command(reward_model_dir, query=query, response=response, input=input, output=output,
                               truncate=true_or_false(truncate, "truncate"))


def labels_from_text(source, input, output, label_type: str = None, truncate=False, **overrides):
    """Write a label file in the released format (OUTPUT, a new file) from text comparisons: INPUT holds one a line,
    {"query": TEXT, "sample0": TEXT, ... (or "samples": [TEXT, ...]), and "best", "score" or "difference"}.

    SOURCE: a train_reward experiment (--some.hparam overrides apply as for train_reward) or a saved run directory;
    its task, encoding and labels.type apply. LABEL_TYPE: instead of the source's labels.type. TRUNCATE: cut texts
    longer than the task's lengths instead of refusing them.
    """
    from lm_human_preferences import text_labels  # no TensorFlow: settings, encodings and the label validator
    text_labels.labels_from_text(source, input, output, label_type=label_type,
                                 truncate=true_or_false(truncate, "truncate"), **overrides)


def list_experiments():
    """Print the registered experiments of each command; a sweep shows its number of trials."""
    for command, registry in experiments.EXPERIMENTS.items():
        names = []
        for name in sorted(registry):
            count = len(experiments.trials(registry[name]))
            names.append(f"{name} (sweep: {count} trials)" if count > 1 else name)
        print(f"{command}: {', '.join(names)}")


def export(save_dir, out_dir, scope: str = "policy"):
    """Write a run's policy (or --scope reward_model) to OUT_DIR as a Hugging Face GPT-2 directory that
    transformers loads as it is: config.json, model.safetensors, GPT-2's tokenizer files, the value head or the
    reward head beside them, and a README.md model card. OUT_DIR must be new (or empty)."""
    from lm_human_preferences.language import hf
    print(f"exported {scope} of {save_dir} to {hf.export(save_dir, out_dir, scope=scope)}")


def plot(*run_dirs, output: str = None, force=False, band: str = "std"):
    """Learning curves of one or more runs in one figure: per tag the mean over the runs as a line and their spread
    as a band (both on the steps every run logged), and each run faintly.

    RUN_DIRS: train_reward / train_policy run directories, or a sweep's SAVE_DIR/NAME (its trials). OUTPUT: the .png
    to write, default plot.png in the current directory; an existing file is refused unless FORCE. BAND: std
    (mean ± 1 sample standard deviation) or minmax.
    """
    from lm_human_preferences import plots
    if not isinstance(force, bool) and os.path.exists(str(force)):  # `--force RUN_DIR`: fire took RUN_DIR as its value
        raise ValueError(f"--force took {force!r} as its value; put --force after the RUN_DIRs (or write --force=true)")
    print(plots.plot_command(run_dirs, output=output, force=true_or_false(force, "force"), band=band).summary())


COMMANDS = {"train_reward": train_reward, "train_policy": train_policy, "demo": demo, "label": label,
            "score": score, "labels_from_text": labels_from_text,
            "experiments": list_experiments, "export": export, "plot": plot}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        with user_errors_in_one_line():  # bad hparams, label files, paths
            fire.Fire(COMMANDS, command=prepare_argv(COMMANDS, argv), name="launch.py")
    except BrokenPipeError:  # `./launch.py ... --dry_run | head`: the reader has what it wanted; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit-time flush would fail again
        sys.exit(141)  # what a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    main()
