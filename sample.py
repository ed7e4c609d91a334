#!/usr/bin/env python3
"""Sample from a trained policy.

    ./sample.py sample --save_dir DIR [--savescope policy] [--temperature 1.0] [--nsamples 0] [--batch_size 4]
                       [--seed S] [--mpi N] [--query_source PATH]

DIR is a train_policy run directory (local, https:// or gs://) holding train_policy_hparams.json and
SCOPE/{hparams.json,encoding,checkpoints/}; the 2019 released runs work as they are. Queries come from
the run's task (test split), formatted exactly as in training.

The defaults are 2019's: temperature 1.0 (the policy's own distribution), batch_size 4, and nsamples 0,
which samples until interrupted. `--temperature task` samples at the run's task.policy.temperature, the
temperature the policy was trained and rolled out at (0.7 for the paper's book tasks).

`--mpi N` samples on N ranks, NSAMPLES shared among them; without it, one rank per visible GPU (1 without
GPUs). Started by an outer launcher (`mpirun -np 8 ./sample.py sample ...`), each process is a rank of
that job and no ranks are started here.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # started by a Python without the dependencies: re-run under .venv/bin/python
    from lm_human_preferences.utils.entry_points import ensure_project_python
    ensure_project_python(__file__)

import fire  # noqa: E402

from lm_human_preferences.utils.entry_points import fire_argv, user_errors_in_one_line  # noqa: E402

SEPARATOR = "=" * 80


def show(text: str) -> str:
    """Newlines as ⏎, so that one episode stays readable on screen."""
    return text.replace("\n", "⏎")


def parse_temperature(temperature):
    """--temperature: a positive number, or "task" (the run's task.policy.temperature, returned as None)."""
    if isinstance(temperature, str) and temperature.strip().lower() == "task":
        return None
    try:
        value = float(temperature) if not isinstance(temperature, bool) else 0.0
    except (TypeError, ValueError):
        value = 0.0
    if not value > 0:
        raise ValueError(f"--temperature: got {temperature!r}, expected a positive number or 'task' "
                         f"(the run's task.policy.temperature)")
    return value


def check_policy_run(save_dir: str, savescope: str):
    """A ValueError saying what a local SAVE_DIR holds unless it is a train_policy run with a policy under
    SAVESCOPE (a remote run is read as it is: its files say so when they are missing)."""
    from lm_human_preferences.text_inputs import describe_directory
    from lm_human_preferences.utils import files
    if files.is_remote(save_dir):
        return
    expected = (f"--save_dir {save_dir}: expected a train_policy run directory (holding train_policy_hparams.json "
                f"and policy/)")
    if not os.path.isdir(save_dir):
        raise ValueError(f"{expected}; {describe_directory(save_dir)}")
    entries = sorted(os.listdir(save_dir))
    if "train_policy_hparams.json" not in entries:
        runs = [name for name in entries
                if os.path.exists(os.path.join(save_dir, name, "train_policy_hparams.json"))]
        if runs:
            found = f"it holds the train_policy runs {', '.join(runs)}: pass one of them"
        elif "train_reward_hparams.json" in entries:
            found = "it holds a train_reward run, whose reward model scores text but samples nothing"
        else:
            found = describe_directory(save_dir)
        raise ValueError(f"{expected}; {found}")
    # the run's policies: scopes saved as models, but not the reward model a run may have trained first
    policies = [name for name in entries if name != "reward_model"
                and os.path.exists(os.path.join(save_dir, name, "hparams.json"))]
    if savescope not in policies:
        what = "the run's reward model, not a policy" if savescope == "reward_model" else "not saved in this run"
        raise ValueError(f"--savescope {savescope}: {what}; the policy scopes of {save_dir}: "
                         f"{', '.join(policies) or 'none'}")


def sample(save_dir, savescope="policy", temperature=1.0, nsamples=0, batch_size=4, seed: int = None,
           mpi: int = None, query_source: str = None):  # the types are for --help: fire shows Optional[int]
    """Print NSAMPLES query/response pairs of the policy saved in SAVE_DIR/SAVESCOPE (0: forever).

    The defaults are 2019's. TEMPERATURE: a number, or `task` for the run's task.policy.temperature (the one it
    was trained at). BATCH_SIZE: queries per batch on each rank. SEED: the query order and sampling seed
    (default the run's run.seed). MPI: ranks, default one per visible GPU (1 without). QUERY_SOURCE: where the
    task's dataset is read from, replacing the run's task.query_source.
    """
    from lm_human_preferences import launcher
    from lm_human_preferences.command_line import number
    from lm_human_preferences.utils import mpi as mpi_utils

    temperature = parse_temperature(temperature)
    nsamples = number(nsamples, int, "--nsamples", "0 (forever) or a positive integer", 0)
    batch_size = number(batch_size, int, "--batch_size", "a positive integer", 1)
    plan = launcher.plan_ranks(None if mpi is None else number(mpi, int, "--mpi", "a positive integer", 1),
                               script="sample.py")
    if plan.note and (not plan.in_outer_job or mpi_utils.is_root()):
        print(plan.note, file=sys.stderr, flush=True)  # stdout holds only the samples
    check_policy_run(str(save_dir), str(savescope))  # before any rank starts
    if plan.ranks > 1 and not plan.in_outer_job:
        # Each rank runs this script again under mpiexec, and joins that job (see launcher.plan_ranks).
        flags = dict(save_dir=save_dir, savescope=savescope, nsamples=nsamples, batch_size=batch_size,
                     temperature="task" if temperature is None else temperature, seed=seed,
                     query_source=query_source, mpi=plan.ranks)
        argv = mpi_utils.mpiexec_command(plan.ranks) + [sys.executable, os.path.abspath(__file__), "sample"]
        argv += [f"--{name}={str(value)!r}" for name, value in flags.items() if value is not None]  # kept as text
        sys.exit(launcher.call_mpiexec(argv, launcher.rank_environment()))  # a rank's error shows once

    import numpy as np

    from lm_human_preferences.utils import devices
    tf = devices.import_tensorflow()  # before anything else imports it: without its start-up notices
    from lm_human_preferences import lm_tasks, train_policy
    from lm_human_preferences.language.trained_models import TrainedModel, missing_files
    from lm_human_preferences.policy import sampler
    from lm_human_preferences.utils import files

    tf.compat.v1.disable_eager_execution()
    mpi_utils.install_abort_on_error()
    run_hparams = files.join(save_dir, "train_policy_hparams.json")
    # offline, the error lists every file of the run that the cache lacks (the policy's too)
    with files.fetching_together(f"run {save_dir}", lambda: files.not_cached([run_hparams]) +
                                 missing_files(files.join(save_dir, savescope))):
        hparams = train_policy.HParams.from_nested_dict(files.read_json(run_hparams), strict=False)
    task = hparams.task
    if query_source is not None:
        task.query_source = query_source
    source = "the run's task.policy.temperature" if temperature is None else "--temperature"
    if temperature is not None:
        task.policy.temperature = temperature
    temperature = task.validate(f"{run_hparams}: task.").policy.temperature  # checked as when the run started
    if mpi_utils.is_root():
        amount = f"{nsamples} samples" if nsamples else "samples until interrupted"
        print(f"sampling {savescope} of {save_dir} at temperature {temperature:g} ({source}), {amount}",
              file=sys.stderr, flush=True)
    trained_model = TrainedModel(savescope, savedir=files.join(save_dir, savescope), scope=savescope)
    encoder = trained_model.encoding.get_encoder()
    shared_seed = hparams.run.seed if seed is None else int(seed)  # one query shuffle, sharded across ranks
    seed = mpi_utils.rank_seed(shared_seed)  # ranks sample differently
    per_rank = nsamples and -(-nsamples // mpi_utils.size())  # ceil; 0 stays "forever"

    with tf.Graph().as_default():
        if seed is not None:
            tf.compat.v1.set_random_seed(seed)
        _, queries_ph, _, sampled = sampler(trained_model, task, encoder, scope="policy")
        query_batches = lm_tasks.query_batches(task, encoder, batch_size, mode="test", seed=shared_seed or 0)
        with devices.new_session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            printed = 0
            while not per_rank or printed < per_rank:
                queries = next(query_batches)
                responses = sess.run(sampled["responses"], {queries_ph: queries})
                for query, response in zip(queries, np.asarray(responses)):
                    if per_rank and printed >= per_rank:
                        break
                    # one write per sample, so that ranks sampling side by side never interleave lines
                    print(f"{SEPARATOR}\n{show(encoder.decode(query))}\n{show(encoder.decode(response))}",
                          flush=True)
                    printed += 1


if __name__ == "__main__":
    with user_errors_in_one_line():
        fire.Fire({"sample": sample}, command=fire_argv(sys.argv[1:]), name="sample.py")
