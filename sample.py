#!/usr/bin/env python3
"""Sample from a trained policy.

    ./sample.py sample --save_dir DIR [--savescope policy] [--temperature T] [--nsamples N] [--batch_size B]
                       [--seed S] [--mpi N] [--query_source PATH]

DIR is a train_policy run directory (local, https:// or gs://) holding train_policy_hparams.json and
SCOPE/{hparams.json,encoding,checkpoints/}; the 2019 released runs work as they are. Queries come from
the run's task (test split), formatted exactly as in training. `--nsamples 0` samples forever.
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402

SEPARATOR = "=" * 80


def show(text: str) -> str:
    """Newlines as ⏎, so that one episode stays readable on screen."""
    return text.replace("\n", "⏎")


def sample(save_dir, savescope="policy", temperature=None, nsamples=10, batch_size=8, seed=None, mpi=1,
           query_source=None):
    """Print NSAMPLES query/response pairs of the policy saved in SAVE_DIR/SAVESCOPE (0: forever)."""
    if mpi > 1:
        from lm_human_preferences.utils import mpi as mpi_utils
        argv = mpi_utils.mpiexec_command(mpi) + [sys.executable, os.path.abspath(__file__), "sample",
                                                 f"--save_dir={save_dir}", f"--savescope={savescope}",
                                                 f"--nsamples={nsamples}", f"--batch_size={batch_size}", "--mpi=1"]
        argv += [f"--{k}={v}" for k, v in dict(temperature=temperature, seed=seed,
                                                  query_source=query_source).items() if v is not None]
        sys.exit(subprocess.call(argv))

    import numpy as np
    import tensorflow as tf

    from lm_human_preferences import lm_tasks, train_policy
    from lm_human_preferences.language.trained_models import TrainedModel
    from lm_human_preferences.policy import Policy
    from lm_human_preferences.utils import devices, files
    from lm_human_preferences.utils import mpi as mpi_utils

    tf.compat.v1.disable_eager_execution()
    mpi_utils.install_abort_on_error()
    hparams = train_policy.HParams.from_nested_dict(
        files.read_json(files.join(save_dir, "train_policy_hparams.json")), strict=False)
    task = hparams.task
    if query_source is not None:
        task.query_source = query_source
    temperature = task.policy.temperature if temperature is None else float(temperature)
    trained_model = TrainedModel(savescope, savedir=files.join(save_dir, savescope), scope=savescope)
    encoder = trained_model.encoding.get_encoder()
    shared_seed = hparams.run.seed if seed is None else int(seed)  # one query shuffle, sharded across ranks
    seed = mpi_utils.rank_seed(shared_seed)  # ranks sample differently
    per_rank = nsamples and -(-nsamples // mpi_utils.size())  # ceil; 0 stays "forever"

    with tf.Graph().as_default():
        if seed is not None:
            tf.compat.v1.set_random_seed(seed)
        policy = Policy(trained_model, scope="policy", temperature=temperature,
                        embed_queries=lm_tasks.query_formatter(task, encoder))
        queries_ph = tf.compat.v1.placeholder(tf.int32, [None, task.query_length])
        responses_op = policy.respond_op(queries_ph, task.response_length)["responses"]
        query_batches = lm_tasks.query_batches(task, encoder, batch_size, mode="test", seed=shared_seed or 0)
        with devices.new_session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            printed = 0
            while not per_rank or printed < per_rank:
                queries = next(query_batches)
                responses = sess.run(responses_op, {queries_ph: queries})
                for query, response in zip(queries, np.asarray(responses)):
                    if per_rank and printed >= per_rank:
                        break
                    # one write per sample, so that ranks sampling side by side never interleave lines
                    print(f"{SEPARATOR}\n{show(encoder.decode(query))}\n{show(encoder.decode(response))}",
                          flush=True)
                    printed += 1


if __name__ == "__main__":
    try:
        fire.Fire({"sample": sample}, name="sample.py")
    except ValueError as error:
        if os.environ.get("LMHP_TRACEBACK"):
            raise
        sys.exit(f"error: {error}\n(set LMHP_TRACEBACK=1 to see where it was raised)")
