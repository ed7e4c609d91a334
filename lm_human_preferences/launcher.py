"""From `./launch.py COMMAND EXPERIMENT NAME [flags]` to running jobs.

`launch` has experiments.resolve_trials expand the experiment into its trials (one, or one per combination of a
sweep's values) and resolve each trial's bindings and the command-line overrides into the command's typed
HParams, all validated before anything runs. Then it prints them (`--dry_run`) or runs the trials:

* one after another, each in this process (one rank) or under `mpiexec -n N` (`--mpi N`);
* side by side (`--trials_in_parallel`): one single-rank subprocess per trial, each given one GPU
  (CUDA_VISIBLE_DEVICES, round-robin over the visible GPUs; on the CPU when there are none); it waits for all
  of them, prefixes each output line with the trial's descriptor, and fails if any trial failed;
* as the ranks of an outer MPI job: when `mpirun`/`mpiexec`/`srun` started this process, it starts no ranks
  of its own; every process runs its rank of each trial here.

Without `--mpi`, a trial gets one rank per visible GPU (GPUs counted without importing TensorFlow), 1 without
GPUs; the choice is printed in one line. The 2019 default was 8, one per GPU of the paper's machines.

The ranks receive the resolved hyperparameters as JSON on their command line, so nothing is pickled into a
shared /tmp path and two runs at once never collide. The module is also the ranks' entry point:
`python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON`.
"""

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

from lm_human_preferences import experiments, preflight
from lm_human_preferences.command_line import mpi_ranks
from lm_human_preferences.experiments import command_hparams, resolve_trials, run_exists
from lm_human_preferences.utils import devices, files
from lm_human_preferences.utils import mpi as mpi_utils
from lm_human_preferences.utils.hyperparams import HParams, flatten

# command -> module defining `train(hparams)`; it builds graphs, so it is imported only to run.
COMMANDS = {
    "train_reward": "lm_human_preferences.train_reward",
    "train_policy": "lm_human_preferences.train_policy",
}
# The directory holding the `lm_human_preferences` package: the ranks import it from there.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_module(command: str):
    """The module that runs `command`; it imports TensorFlow."""
    command_hparams(command)  # an unknown command fails here
    devices.import_tensorflow()  # the command modules build graphs: TensorFlow loads here, without its notices
    return importlib.import_module(COMMANDS[command])


# ----- how many ranks --------------------------------------------------------------------------------------------

def visible_gpus() -> List[str]:
    """The ids of the GPUs this process may use, found without importing TensorFlow (slow, and it would
    claim GPU memory in the launching process): CUDA_VISIBLE_DEVICES when it is set, else the GPUs that
    `nvidia-smi -L` lists; [] on a machine without GPUs or without NVIDIA's driver."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for item in listed.split(","):
            item = item.strip()
            if not item or item.startswith("-"):  # CUDA ignores everything from an invalid id on ("-1": none)
                break
            ids.append(item)
        return ids
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    if listing.returncode != 0:
        return []
    gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]  # not its MIG sub-lines
    return [str(index) for index in range(len(gpus))]


def outer_job_size() -> Optional[int]:
    """The number of processes in the MPI job that started this one (mpirun, mpiexec, srun), read from the
    launcher's environment without initialising MPI; None when no MPI launcher started this process."""
    if not mpi_utils.launched_by_mpi():
        return None
    for variable in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):  # the variables launched_by_mpi looks at
        if os.environ.get(variable):
            return int(os.environ[variable])
    return None


@dataclasses.dataclass(frozen=True)
class RankPlan:
    ranks: int  # processes per trial
    in_outer_job: bool  # this process is one rank of a job an outer MPI launcher started: run the rank here
    note: Optional[str]  # one line saying how `ranks` was chosen, when --mpi did not say


def plan_ranks(mpi: Optional[int], *, trials_in_parallel: bool = False, script: str = "launch.py") -> RankPlan:
    """How many ranks each trial runs on: `--mpi N`, else one per visible GPU (1 without GPUs), or the
    ranks of the outer MPI job that started this process."""
    outer = outer_job_size()
    if outer is not None:
        if trials_in_parallel:
            raise ValueError(f"--trials_in_parallel starts one process per trial, but this {script} is one of "
                             f"{outer} ranks started by an outer MPI launcher (mpirun/mpiexec/srun); run it "
                             f"without the outer launcher, or drop --trials_in_parallel")
        if mpi is not None and mpi_ranks(mpi) != outer:
            raise ValueError(f"--mpi {mpi} disagrees with the outer MPI job of {outer} ranks that started this "
                             f"{script} (it joins that job and starts no ranks of its own); drop --mpi, or "
                             f"start the job with {mpi} ranks")
        note = None if mpi is not None else f"--mpi not given: joining the outer MPI job of {outer} ranks"
        return RankPlan(outer, True, note)
    if mpi is not None:
        mpi = mpi_ranks(mpi)
        if trials_in_parallel and mpi > 1:
            raise ValueError(f"--trials_in_parallel runs each trial as a single process (one GPU each) and cannot "
                             f"be combined with --mpi {mpi}; drop one of them (trials then run one after "
                             f"another, each on {mpi} ranks)")
        return RankPlan(mpi, False, None)
    if trials_in_parallel:
        return RankPlan(1, False, "--mpi not given: 1 rank per trial (--trials_in_parallel)")
    gpus = len(visible_gpus())
    if gpus == 0:
        return RankPlan(1, False, "--mpi not given: 1 rank (no GPU found)")
    return RankPlan(gpus, False, f"--mpi not given: {gpus} rank{'s' if gpus > 1 else ''} (one per visible GPU)")


# ----- running the trials ----------------------------------------------------------------------------------------

def launch(command: str, experiment: str, name: str, *, mpi: Optional[int] = None, save_dir: str = None,
           dry_run: bool = False, trials_in_parallel: bool = False, resume: bool = False,
           overrides: Dict[str, Any] = None) -> List[Tuple[experiments.Trial, HParams]]:
    """Resolve every trial, then print them (dry_run) or run them; returns the trials. An existing run is never
    overwritten: `resume` continues it (see trainer.py), with the same hyperparameters."""
    plan = plan_ranks(mpi, trials_in_parallel=trials_in_parallel)
    mpi_utils.check_allreduce_choice(plan.ranks)
    trials = resolve_trials(command, experiment, name, save_dir=save_dir, overrides=overrides)
    for _, hparams in trials:  # a run that cannot work stops here, before any rank starts (--dry_run: offline checks)
        preflight.check(command, hparams, plan.ranks, dry_run=dry_run)
    if not dry_run:
        for _, hparams in trials:
            _on_rank_0(plan, lambda: check_run_directory(command, hparams, resume))
    speaks = not plan.in_outer_job or mpi_utils.is_root()  # ranks of an outer job: rank 0 prints for all
    if plan.note and speaks:
        print(plan.note, file=sys.stderr if dry_run else sys.stdout, flush=True)
    if dry_run:
        if speaks:
            print_trials(trials)
        return trials
    if trials_in_parallel:
        run_in_parallel(command, trials, resume=resume)
        return trials
    for index, (trial, hparams) in enumerate(trials):
        if len(trials) > 1 and speaks:
            print(f"trial {index + 1} of {len(trials)}: {trial.descriptor} -> {hparams.run.save_dir}", flush=True)
        if plan.in_outer_job or plan.ranks == 1:
            run(command, hparams, resume=resume)
            continue
        argv, env = rank_command(command, hparams, plan.ranks, resume=resume)
        returncode = call_forwarding_stop_signals(argv, env)
        if returncode != 0:
            if len(trials) > 1:
                print(f"trial {trial.descriptor} failed (exit code {returncode}); "
                      f"{len(trials) - index - 1} later trials not run", file=sys.stderr, flush=True)
            sys.exit(returncode)
    return trials


def print_trials(trials: List[Tuple[experiments.Trial, HParams]]):
    """A single trial prints its hyperparameters as JSON (as `HParams.to_json`); a sweep prints a JSON list
    with, for each trial, its descriptor, save_dir, swept values and hyperparameters."""
    if len(trials) == 1 and not trials[0][0].descriptor:
        print(trials[0][1].to_json())
        return
    listing = [{"descriptor": trial.descriptor, "save_dir": hparams.run.save_dir, "swept": trial.swept,
                "hparams": hparams.to_nested_dict()} for trial, hparams in trials]
    print(json.dumps(listing, indent=2, default=str))


def rank_environment() -> Dict[str, str]:
    """This process's environment with PYTHONPATH leading with the package's directory, so that child processes
    import this checkout even when it is not pip-installed and `launch.py` was started from another directory."""
    python_path = [PACKAGE_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))


def rank_argv(command: str, hparams: HParams, resume: bool = False) -> List[str]:
    """argv of one process running `command` with `hparams` (this module's entry point)."""
    return [sys.executable, "-m", "lm_human_preferences.launcher", command, hparams.to_json()] + \
        (["--resume"] if resume else [])


def rank_command(command: str, hparams: HParams, mpi: int, resume: bool = False) -> Tuple[List[str], Dict[str, str]]:
    """argv and environment that start `mpi` ranks of this module, each running `command` with `hparams`."""
    return mpi_utils.mpiexec_command(mpi_ranks(mpi)) + rank_argv(command, hparams, resume), rank_environment()


def call_forwarding_stop_signals(argv: List[str], env: Dict[str, str]) -> int:
    """Run `mpiexec ...` and return its exit code; a SIGTERM, SIGINT or SIGUSR1 sent to this process reaches
    every rank as SIGUSR1, so that the ranks stop together with their state saved.

    Open MPI's mpiexec kills its ranks at once on SIGTERM/SIGINT but forwards SIGUSR1 to them, so mpiexec runs
    in a session of its own (a scheduler's or Ctrl-C's signal to our process group does not reach it) and we
    forward. A second SIGINT (Ctrl-C again) ends the ranks at once."""
    return call_mpiexec(argv, env, forward_stop_signals=True)


# Open MPI's banners after a rank failed (it called MPI_Abort, or exited non-zero): they repeat, in 5 to 10
# lines each, that the job failed, after the rank's own error. (A rank killed by a signal keeps its banner.)
OPEN_MPI_FAILURE_BANNERS = ("MPI_ABORT was invoked on rank", "exited with non-zero status", 'calling\n"abort"')


def call_mpiexec(argv: List[str], env: Dict[str, str], forward_stop_signals: bool = False) -> int:
    """Run `mpiexec ...` and return its exit code. The ranks' stderr passes through `relay_rank_stderr`: a user
    error that every rank met shows once, in its one line, without Open MPI's failure banners. With
    `forward_stop_signals`, mpiexec runs in a session of its own and receives our stop signals as SIGUSR1 (see
    call_forwarding_stop_signals)."""
    process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=forward_stop_signals)
    relay = threading.Thread(target=relay_rank_stderr, args=(process.stderr, sys.stderr), daemon=True)
    relay.start()
    with stop_signals_forwarded([process]) if forward_stop_signals else contextlib.nullcontext():
        returncode = process.wait()
    relay.join()
    return returncode


def relay_rank_stderr(stream, out):
    """Copy the ranks' stderr to `out` line by line, except a repeat of an `error:` line already shown (each rank
    reports the same user error; so also its LMHP_TRACEBACK hint) and Open MPI's failure banners (blocks between
    lines of dashes)."""
    errors_shown = set()
    banner = None  # the lines of an Open MPI banner being read, or None outside one

    def show(lines):
        out.write("".join(lines))
        out.flush()

    for line in stream:
        line = line.replace("\0", "")  # Open MPI writes a NUL before some banners
        if line.startswith("-" * 20) and line.strip("-\n") == "":
            if banner is None:
                banner = [line]
                continue
            banner.append(line)
            if not any(marker in "".join(banner) for marker in OPEN_MPI_FAILURE_BANNERS):
                show(banner)
            banner = None
        elif banner is not None:
            banner.append(line)
        elif line.startswith(("error: ", "(set LMHP_TRACEBACK=1")):
            if line not in errors_shown:
                errors_shown.add(line)
                show([line])
        else:
            show([line])
    if banner:
        show(banner)
    stream.close()


@contextlib.contextmanager
def stop_signals_forwarded(processes: List[subprocess.Popen]):
    """Inside, a SIGTERM, SIGINT or SIGUSR1 sent to this process reaches each of `processes` still running (the
    list may grow inside) as SIGUSR1, the trainers' signal to stop with their state saved; a second SIGINT
    terminates them. Outside the main thread, where Python cannot set signal handlers, nothing changes."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        for process in processes:
            if process.poll() is None:
                if len(received) > 1 and signum == signal.SIGINT:
                    process.terminate()
                else:
                    process.send_signal(signal.SIGUSR1)

    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {signum: signal.signal(signum, forward) for signum in stop_signals} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ----- existing runs ---------------------------------------------------------------------------------------------

# Hyperparameters that cannot change what a run computes (logging, checkpoint frequency, where it is saved): a
# --resume may give them other values. Matched as the last parts of a dotted name, nested groups included.
RESULT_NEUTRAL = ("run.log_interval", "run.save_interval", "run.save_dir", "run.judge",
                  "labels.online.host", "labels.online.port", "labels.online.token")  # where people label


def _on_rank_0(plan: "RankPlan", check):
    """Run `check` (which raises ValueError) once: on rank 0 of an outer MPI job, whose verdict every rank
    shares (a rank checking while rank 0 already writes would see a run that is not there yet); else here."""
    if not plan.in_outer_job:
        return check()
    message = None
    if mpi_utils.is_root():
        try:
            check()
        except ValueError as error:
            message = str(error)
    message = mpi_utils.broadcast(message)
    if message is not None:
        raise ValueError(message)


def check_run_directory(command: str, hparams: HParams, resume: bool):
    """Refuse to overwrite an existing run; with `resume`, refuse one saved with hyperparameters that change
    results (the message lists each difference)."""
    save_dir = hparams.run.save_dir
    if save_dir is None or not run_exists(save_dir):
        return
    if not resume:
        raise ValueError(f"{save_dir} already holds a run, and a run is never overwritten: continue it with the "
                         f"same command and --resume, or choose another NAME (or --save_dir)")
    saved_path = files.join(save_dir, f"{command}_hparams.json")
    if not files.exists(saved_path):
        raise ValueError(f"--resume: {save_dir} holds no {command}_hparams.json, so it is not a {command} run "
                         f"that can be continued; choose another NAME (or --save_dir)")
    saved = flatten(files.read_json(saved_path))
    now = flatten(hparams.to_nested_dict())
    neutral = [name for name in set(saved) | set(now)
               if any(name == n or name.endswith("." + n) for n in RESULT_NEUTRAL)]
    if command == "train_policy" and hparams.rewards.train_new_model is not None:
        neutral.append("rewards.trained_model")  # the run records there the reward model it trained
    differences = [f"{name}: saved {saved.get(name)!r}, now {now.get(name)!r}"
                   for name in sorted(set(saved) | set(now))
                   if saved.get(name) != now.get(name) and name not in neutral]
    if differences:
        raise ValueError(f"--resume: {save_dir} was saved with other hyperparameters, which would change its "
                         f"results:\n  " + "\n  ".join(differences) +
                         "\nresume with the saved values, or start a new run under another NAME")


def run_in_parallel(command: str, trials: List[Tuple[experiments.Trial, HParams]], resume: bool = False):
    """Run every trial at once, each a single-rank subprocess with one GPU (round-robin; CPU without GPUs).

    Every output line is prefixed with `[DESCRIPTOR]`. Waits for all trials; if any failed, exits with an error
    naming them (the others still ran to their end). A stop signal (SIGTERM, Ctrl-C) reaches every trial, which
    stops with its state saved, as a single run does.
    """
    gpus = visible_gpus()
    lock = threading.Lock()
    started = []  # (descriptor, process, relay thread)
    processes = []
    try:
        with stop_signals_forwarded(processes):
            for index, (trial, hparams) in enumerate(trials):
                label = trial.descriptor or os.path.basename(hparams.run.save_dir)
                env = rank_environment()
                device = "CPU"
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = device = gpus[index % len(gpus)]
                    device = f"GPU {device}"
                print(f"trial {label} starting on {device} -> {hparams.run.save_dir}", flush=True)
                # a session of its own: the stop signals reach it once, forwarded (see call_forwarding_stop_signals)
                process = subprocess.Popen(rank_argv(command, hparams, resume=resume), env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, errors="replace",
                                           start_new_session=True)
                processes.append(process)
                relay = threading.Thread(target=_relay_lines, args=(process.stdout, f"[{label}] ", lock), daemon=True)
                relay.start()
                started.append((label, process, relay))
            failed = []
            for label, process, relay in started:
                returncode = process.wait()
                relay.join()
                if returncode != 0:
                    failed.append(f"{label} (exit code {returncode})")
    finally:
        for process in processes:
            if process.poll() is None:  # an error here: do not leave trials running behind us
                process.terminate()
                process.wait()
    if failed:
        sys.exit(f"error: {len(failed)} of {len(started)} trials failed: {', '.join(failed)}")
    print(f"all {len(started)} trials finished", flush=True)


def _relay_lines(stream, prefix: str, lock: threading.Lock):
    for line in stream:
        with lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    stream.close()


@contextlib.contextmanager
def abort_job_on_exit():
    """A `sys.exit` with a failure code on one MPI rank ends the whole job.

    `sys.exit` raises SystemExit, which never reaches `sys.excepthook` (where `mpi.install_abort_on_error`
    catches exceptions): the rank would wait in MPI_Finalize while the others wait for it in a collective,
    a hang. So we abort with the rank's code. With a single process, or exit code 0, nothing changes.
    """
    try:
        yield
    except SystemExit as request:
        world = mpi_utils.comm()
        if world is not None and request.code not in (None, 0):
            code = request.code if isinstance(request.code, int) else 1  # sys.exit("message") means 1
            sys.stderr.write(f"[rank {world.Get_rank()} of {world.Get_size()}] exited with code {code}"
                             + ("" if isinstance(request.code, int) else f": {request.code}")
                             + "; aborting the job\n")
            sys.stderr.flush()
            sys.stdout.flush()
            world.Abort(code)  # ends every rank; does not return
        raise


def run(command: str, hparams: HParams, resume: bool = False):
    """Run the job in this process (one MPI rank, or the only process). A run stopped by a signal (its state
    saved, every rank at the same step) exits with trainer.INTERRUPTED_EXIT_CODE."""
    tf = devices.import_tensorflow()
    from lm_human_preferences import trainer
    mpi_utils.install_abort_on_error()
    tf.compat.v1.disable_eager_execution()
    try:
        with abort_job_on_exit(), tf.Graph().as_default():  # a fresh graph per trial when several run here
            command_module(command).train(hparams, resume=resume)
    except trainer.RunInterrupted as stop:  # every rank stops here alike: a normal exit, no MPI abort
        if mpi_utils.is_root():
            print(stop, flush=True)
        sys.exit(trainer.INTERRUPTED_EXIT_CODE)


def hparams_from_json(command: str, hparams_json: str) -> HParams:
    """The validated hyperparameters a rank received on its command line (the output of HParams.to_json)."""
    try:
        data = json.loads(hparams_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"the {command} hyperparameters are not valid JSON ({error}); expected the nested "
                         f"object that `./launch.py {command} EXPERIMENT NAME --dry_run` prints") from None
    return command_hparams(command).from_nested_dict(data).validate()


USAGE = ("usage: python -m lm_human_preferences.launcher COMMAND HPARAMS_JSON [--resume]  "
         "(COMMAND: train_reward, train_policy)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    resume = argv[2:] == ["--resume"]
    if len(argv) != 2 and not resume:
        sys.exit(USAGE)
    command, hparams_json = argv[:2]
    try:
        hparams = hparams_from_json(command, hparams_json)
    except ValueError as error:  # every rank got the same JSON, so every rank stops here alike: no hang
        sys.exit(f"error: {error}")
    run(command, hparams, resume=resume)


if __name__ == "__main__":
    main()
