#!/usr/bin/env python3
"""Benchmarks: throughput, model-FLOPs utilisation, memory and cost growth of every stage.

    ./bench.py                                   the `small` CPU size (4 layers, 256 wide)
    ./bench.py --size 124M --batch 4             GPT-2 124M-shaped, random weights (nothing is downloaded)
    ./bench.py --size test --repeats 1 --growth_steps 1 --output /tmp/bench.json
    ./bench.py --size 124M --mixed_precision --xla --peak_flops 989e12

Models have random weights of the chosen size (`test`, `demo`, `small`, `124M`); every stage is timed after
`warmup` untimed runs, as the median of `repeats` runs:

* sampling: `Policy.respond_op` with the key/value cache, response tokens per second;
* reward model: forward (query + response pairs per second) and one Adam step on best_of_4 labels;
* one PPO update end to end (`train_policy.PPOTrainer.update`), split into its parts;
* model-FLOPs utilisation: FLOPs counted from the shapes (lm_human_preferences/flops.py) / time / peak;
* peak host RSS, and peak GPU memory where there is a GPU;
* cost growth: the PPO update while the batch size doubles, and while the response length doubles;
* speed switches: XLA auto-clustering (`run.xla`) and bf16 mixed precision (`run.mixed_precision`, GPU only);
* the gradient all-reduce: a GPT-2 124M-sized float32 buffer (about 500 MB) averaged over `allreduce_ranks` MPI
  ranks through each path (mpi4py, and horovod where `make horovod` built it), beside the PPO update's time.

A table goes to stdout, everything to the JSON file `--output` (default bench_results.json).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # started by a Python without the dependencies: re-run under .venv/bin/python
    from lm_human_preferences.utils.entry_points import ensure_project_python
    ensure_project_python(__file__)

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import fire  # noqa: E402

from lm_human_preferences.utils.entry_points import fire_argv  # noqa: E402


# ----- the command (first: --help shows it without importing TensorFlow) ----------------------------------------

def main(size: str = "small", batch: int = None, query_length: int = None, response_length: int = None,
         warmup: int = 1, repeats: int = 3, noptepochs: int = 4, growth_steps: int = 2, switches: bool = True,
         xla: bool = False, mixed_precision: bool = False, peak_flops: float = None, allreduce_ranks: int = 2,
         allreduce_elements: int = None,
         output: str = "bench_results.json"):  # `int = None`: fire's --help shows Optional[int]
    """Benchmark one model size; see the module docstring.

    Args:
        size: test, demo, small or 124M (random weights of that shape)
        batch: episodes per PPO update and labels per reward step (default: the size's)
        query_length: query tokens (default: the size's)
        response_length: response tokens (default: the size's)
        warmup: untimed runs before each measurement
        repeats: timed runs; the median is reported
        noptepochs: PPO epochs per update (2019 default 4)
        growth_steps: doublings of the batch and of the response length in the cost-growth tables (0: none)
        switches: also measure XLA on/off and (on a GPU, or with --mixed_precision) bf16 on/off
        xla: base setting of run.xla
        mixed_precision: base setting of run.mixed_precision (bf16 compute, float32 weights)
        peak_flops: the device's peak FLOP/s for the MFU (default: a datasheet table or a CPU estimate)
        allreduce_ranks: MPI ranks of the all-reduce measurement (0: skip it)
        allreduce_elements: float32 values all-reduced (default: GPT-2 124M's parameter count, 124,439,808)
        output: the JSON file written
    """
    run(str(size), batch=batch, query_length=query_length, response_length=response_length, warmup=warmup,
        repeats=repeats, noptepochs=noptepochs, growth_steps=growth_steps, switches=switches, xla=xla,
        mixed_precision=mixed_precision, peak_flops=peak_flops, allreduce_ranks=allreduce_ranks,
        allreduce_elements=allreduce_elements, output=output)


if __name__ == "__main__" and fire_argv(sys.argv[1:]) != sys.argv[1:]:  # --help
    fire.Fire(main, command=fire_argv(sys.argv[1:]), name="bench.py")
    sys.exit()

import numpy as np  # noqa: E402

from lm_human_preferences.utils import devices  # noqa: E402

tf = devices.import_tensorflow()  # without its start-up notices

tf.compat.v1.disable_eager_execution()
tf1 = tf.compat.v1

from lm_human_preferences import flops, label_types, launcher, rewards  # noqa: E402
from lm_human_preferences.language import model as lm_model  # noqa: E402
from lm_human_preferences.language.trained_models import TrainedModel  # noqa: E402
from lm_human_preferences.train_policy import PPOTrainer  # noqa: E402
from lm_human_preferences.utils import train_ops  # noqa: E402

REWARD_LABEL_TYPE = "best_of_4"
PPO_PARTS = ("rollout", "ref_logprobs", "score", "ppo_epochs", "stats")


# ----- what is measured -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    description: str
    make_model: Callable[[], TrainedModel]
    batch: int  # default episodes per PPO update (and labels per reward step)
    query_length: int  # default query tokens
    response_length: int  # default response tokens


SIZES: Dict[str, Size] = {
    "test": Size("built-in `test` model: 2 layers, 7 wide, 1 head, vocab 27, n_ctx 8",
                 lambda: TrainedModel("test"), batch=8, query_length=2, response_length=2),
    "demo": Size("built-in `demo` model: 2 layers, 32 wide, 4 heads, vocab 27, n_ctx 64",
                 lambda: TrainedModel("demo"), batch=64, query_length=8, response_length=12),
    "small": Size("4 layers, 256 wide, 4 heads, vocab 27 (`test` encoding), n_ctx 256",
                  lambda: TrainedModel.random("bench-small", lm_model.HParams(
                      n_vocab=27, n_ctx=256, n_embd=256, n_head=4, n_layer=4), "test"),
                  batch=16, query_length=32, response_length=32),
    "124M": Size("GPT-2 124M shape: 12 layers, 768 wide, 12 heads, vocab 50257, n_ctx 1024",
                 lambda: TrainedModel.random("bench-gpt2-124M", lm_model.HParams(), "main"),
                 batch=4, query_length=64, response_length=24),
}


@dataclass(frozen=True)
class Shape:
    batch: int
    query_length: int
    response_length: int


@dataclass(frozen=True)
class Settings:
    warmup: int
    repeats: int
    noptepochs: int
    xla: bool
    mixed_precision: bool


def timed_runs(fn: Callable, settings: Settings) -> List[tuple]:
    """[(seconds, fn's result)] of `repeats` runs after `warmup` untimed ones."""
    for _ in range(settings.warmup):
        fn()
    runs = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    return runs


def rate(runs, flop_count, peak, **counts) -> dict:
    """Throughput figures of a stage whose timed `runs` each handled `counts` (e.g. tokens=...) and
    `flop_count` FLOPs: median seconds, {unit}_per_second, FLOP/s and the model-FLOPs utilisation (None
    without a known peak)."""
    seconds = float(statistics.median(run_seconds for run_seconds, _ in runs))
    achieved = flop_count / seconds
    return {"seconds": seconds, "repeats_seconds": [run_seconds for run_seconds, _ in runs],
            **{f"{unit}_per_second": count / seconds for unit, count in counts.items()},
            "flops": int(flop_count), "flops_per_second": achieved, "mfu": None if not peak else achieved / peak}


# ----- memory ---------------------------------------------------------------------------------------------------

def host_peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gpu_memory(reset: bool = False) -> Optional[int]:
    """Peak bytes allocated on GPU:0 since the last reset (None without a GPU); resets the peak if asked."""
    if not devices.gpu_count():
        return None
    try:
        peak = int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
        if reset:
            tf.config.experimental.reset_memory_stats("GPU:0")
        return peak
    except (ValueError, RuntimeError, tf.errors.OpError):  # an allocator without statistics
        return None


def memory_after_stage() -> dict:
    """Peak host RSS of the process so far; peak GPU memory during this stage (since the previous one)."""
    return {"host_peak_rss_bytes": host_peak_rss_bytes(), "gpu_peak_bytes": gpu_memory(reset=True)}


def overall_memory(results) -> dict:
    """Peak host RSS of the whole run, and the largest of the stages' GPU peaks (None without a GPU)."""
    def gpu_peaks(node):
        if isinstance(node, dict):
            if node.get("gpu_peak_bytes") is not None:
                yield node["gpu_peak_bytes"]
            for value in node.values():
                yield from gpu_peaks(value)
        elif isinstance(node, list):
            for value in node:
                yield from gpu_peaks(value)
    return {"host_peak_rss_bytes": host_peak_rss_bytes(), "gpu_peak_bytes": max(gpu_peaks(results), default=None)}


# ----- the device -----------------------------------------------------------------------------------------------

def read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def device_info(peak_flops: Optional[float], compute_dtype: str) -> dict:
    """What runs the benchmark and its peak FLOP/s: --peak_flops, else a datasheet table (GPU) or an estimate
    from the clock and SIMD width (CPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
        tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
        peak, source = flops.gpu_peak_flops(name, dtype=compute_dtype, tf32=tf32)
        kind, count = "gpu", len(gpus)
    else:
        cpuinfo = read_cpuinfo()
        model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name")), "unknown CPU")
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        peak, source = flops.cpu_peak_flops(cpuinfo, count)
        kind, name = "cpu", model_name
    if peak_flops is not None:
        peak, source = float(peak_flops), "given by --peak_flops"
    return {"kind": kind, "name": name, "count": count, "compute_dtype": compute_dtype, "peak_flops": peak,
            "peak_flops_source": source}


# ----- PPO: sampling and whole updates --------------------------------------------------------------------------

def ppo_hparams(shape: Shape, settings: Settings, *, xla: bool, mixed_precision: bool):
    """The `test` policy experiment reshaped: this batch, query and response length, one update, no saving."""
    return launcher.resolve_hparams("train_policy", "test", "bench", overrides={
        "task.query_length": shape.query_length, "task.response_length": shape.response_length,
        "rewards.train_new_model": "off", "rewards.trained_model": "random weights (bench.py)",
        "ppo.batch_size": shape.batch, "ppo.total_episodes": shape.batch, "ppo.noptepochs": settings.noptepochs,
        "ppo.nminibatches": 1, "ppo.micro_batches": 1, "ppo.lr": 1e-5,
        "ppo.whiten_rewards": shape.batch >= 8,  # whitening needs 8 episodes; the CPU rows time batches of 2
        "run.xla": xla, "run.mixed_precision": mixed_precision, "run.seed": 1})


def random_tokens(rng, n_vocab, *shape):
    return rng.randint(0, n_vocab, size=shape).astype(np.int32)


def measure_ppo(trained_model: TrainedModel, shape: Shape, settings: Settings, peak, *, xla=None,
                mixed_precision=None, sampling=True) -> dict:
    """Build a PPOTrainer (policy, reference policy and reward model from `trained_model`) and time sampling
    (optional) and whole PPO updates."""
    xla = settings.xla if xla is None else xla
    mixed_precision = settings.mixed_precision if mixed_precision is None else mixed_precision
    hparams = ppo_hparams(shape, settings, xla=xla, mixed_precision=mixed_precision)
    model_hparams = trained_model.hparams()
    queries = random_tokens(np.random.RandomState(0), model_hparams.n_vocab, shape.batch, shape.query_length)
    results = {"batch": shape.batch, "query_length": shape.query_length, "response_length": shape.response_length,
               "xla": xla, "mixed_precision": mixed_precision}
    encoder = trained_model.encoding.get_encoder()
    context_length = (len(encoder.encode(hparams.task.query_prefix)) + shape.query_length +
                      len(encoder.encode(hparams.task.query_suffix)))  # what the policy reads
    with tf.Graph().as_default():
        trainer = PPOTrainer(hparams, trained_model, trained_model, encoder)
        try:
            if sampling:
                feed = {trainer.queries: queries, trainer.rollout_seed: [1, 2]}
                runs = timed_runs(lambda: trainer.sess.run(trainer.rollout_op, feed), settings)
                sample_flops = flops.sampling_flops(model_hparams, batch=shape.batch, context_length=context_length,
                                                    response_length=shape.response_length)
                results["sampling"] = rate(runs, sample_flops, peak,
                                           tokens=shape.batch * shape.response_length)
                results["sampling"]["memory"] = memory_after_stage()
            runs = timed_runs(lambda: trainer.update(queries, 0)[1]["timings"], settings)
        finally:
            trainer.sess.close()
    part_flops = flops.ppo_update_flops(model_hparams, model_hparams, batch=shape.batch,
                                        context_length=context_length, query_length=shape.query_length,
                                        response_length=shape.response_length, noptepochs=settings.noptepochs)
    update = rate(runs, sum(part_flops.values()), peak, episodes=shape.batch)
    update["parts"] = {}
    for part in PPO_PARTS:
        seconds = float(statistics.median(timings[part] for _, timings in runs))
        update["parts"][part] = {"seconds": seconds, "share": seconds / update["seconds"], "flops": part_flops[part],
                                 "mfu": None if not peak or not part_flops[part] else
                                 part_flops[part] / seconds / peak}
    update["memory"] = memory_after_stage()
    results["ppo_update"] = update
    return results


# ----- reward model ---------------------------------------------------------------------------------------------

def measure_reward_model(trained_model: TrainedModel, shape: Shape, settings: Settings, peak) -> dict:
    """Reward model forward on (query, response) pairs and training steps on best_of_4 labels."""
    model_hparams = trained_model.hparams()
    label_type = label_types.get(REWARD_LABEL_TYPE)
    rng = np.random.RandomState(0)
    labels = {"query": random_tokens(rng, model_hparams.n_vocab, shape.batch, shape.query_length),
              "best": rng.randint(0, label_type.num_samples, size=shape.batch).astype(np.int32),
              **{name: random_tokens(rng, model_hparams.n_vocab, shape.batch, shape.response_length)
                 for name in label_type.sample_fields()}}
    with tf.Graph().as_default():
        tf1.set_random_seed(1)
        compute_dtype = tf.bfloat16 if settings.mixed_precision else tf.float32
        reward_model = rewards.RewardModelTrainer(trained_model, scope="reward_model", compute_dtype=compute_dtype)
        placeholders = {name: tf1.placeholder(dtype, [None, *field_shape], name=name) for name, (dtype, field_shape)
                        in label_type.label_schemas(shape.query_length, shape.response_length).items()}
        forward_op = reward_model.get_rewards_op(placeholders["query"], placeholders["sample0"])  # [b]
        loss, _ = label_type.loss(reward_model.get_rewards_op, placeholders)
        optimizer = train_ops.Optimizer(loss, reward_model.get_params(), 1e-5, epsilon=1e-5)
        feed = {placeholders[name]: values for name, values in labels.items()}
        with devices.new_session(xla=settings.xla) as sess:
            sess.run(tf1.global_variables_initializer())
            forward_runs = timed_runs(lambda: sess.run(forward_op, feed), settings)
            forward_memory = memory_after_stage()
            train_runs = timed_runs(lambda: optimizer.step(sess, [feed]), settings)
    shapes = dict(query_length=shape.query_length, response_length=shape.response_length)
    forward = rate(forward_runs, flops.reward_flops(model_hparams, batch=shape.batch, **shapes), peak,
                   examples=shape.batch)  # an example: one query + response
    forward["memory"] = forward_memory
    train = rate(train_runs, flops.reward_training_flops(
        model_hparams, batch=shape.batch, num_samples=label_type.num_samples, **shapes), peak,
        examples=shape.batch)  # an example: one label, a query and its 4 responses
    train["memory"] = memory_after_stage()
    return {"label_type": REWARD_LABEL_TYPE, "forward": forward, "train": train}


# ----- cost growth and switches ---------------------------------------------------------------------------------

def growth_rows(trained_model, base: dict, shape: Shape, settings: Settings, peak, *, dimension: str,
                steps: int, log) -> List[dict]:
    """The PPO update at `shape` (the base measurement) and with `dimension` doubled `steps` times."""
    rows = [base]
    n_ctx = trained_model.hparams().n_ctx
    for step in range(1, steps + 1):
        factor = 2 ** step
        bigger = Shape(shape.batch * factor if dimension == "batch" else shape.batch, shape.query_length,
                       shape.response_length * factor if dimension == "response_length" else shape.response_length)
        if bigger.query_length + bigger.response_length > n_ctx:
            rows.append({"batch": bigger.batch, "response_length": bigger.response_length,
                         "skipped": f"query + response = {bigger.query_length + bigger.response_length} tokens "
                                    f"exceed the model's n_ctx {n_ctx}"})
            break
        log(f"  growth: {dimension} x{factor} ...")
        rows.append(measure_ppo(trained_model, bigger, settings, peak, sampling=False))
    table = []
    previous = None
    for row in rows:
        entry = {"batch": row["batch"], "response_length": row["response_length"]}
        if "skipped" in row:
            entry["skipped"] = row["skipped"]
        else:
            update = row["ppo_update"]
            entry.update(seconds=update["seconds"], ratio=None if previous is None else update["seconds"] / previous,
                         episodes_per_second=update["episodes_per_second"], mfu=update["mfu"],
                         parts={part: update["parts"][part]["seconds"] for part in PPO_PARTS},
                         memory=update["memory"])
            previous = update["seconds"]
        table.append(entry)
    return table


def switch_entry(off: dict, on: dict) -> dict:
    """Sampling and PPO-update seconds with a switch off and on; speedup = off / on."""
    entry = {}
    for stage in ("sampling", "ppo_update"):
        entry[stage] = {"off_seconds": off[stage]["seconds"], "on_seconds": on[stage]["seconds"],
                        "speedup": off[stage]["seconds"] / on[stage]["seconds"]}
    return entry


def xla_note() -> Optional[str]:
    if devices.gpu_count():
        return None
    flag = devices.CPU_XLA_FLAG
    if devices.cpu_xla_enabled():  # devices.import_tensorflow sets it, as for training with run.xla
        return f"measured with TF_XLA_FLAGS={flag}, without which XLA compiles no CPU ops"
    return f"on a CPU, XLA compiles nothing unless TF_XLA_FLAGS={flag} is set: this measured no change"


# ----- the command ----------------------------------------------------------------------------------------------

GPT2_124M_PARAMETERS = 124_439_808  # 50257x768 + 1024x768 embeddings, 12 blocks of 7,087,872, the final layer norm


def measure_allreduce(elements: int, ranks: int, settings: Settings) -> dict:
    """The gradient all-reduce of `elements` float32 values over `ranks` MPI ranks, through mpi4py and through
    horovod (where it is built): median seconds, and the bus bandwidth 2 (n - 1) / n x bytes / seconds (what a ring
    all-reduce moves per rank), for comparison with the PPO update's time."""
    result = {"elements": elements, "bytes": 4 * elements, "ranks": ranks, "paths": {}}
    if not ranks:
        result["skipped"] = "--allreduce_ranks 0"
        return result
    if ranks == 1:
        result["skipped"] = "one rank all-reduces nothing (--allreduce_ranks must be 2 or more to measure)"
        return result
    import importlib.util
    import subprocess
    from lm_human_preferences.utils import allreduce_timing, mpi
    for path in mpi.ALLREDUCE_CHOICES:
        if path == "horovod" and importlib.util.find_spec("horovod") is None:
            result["paths"][path] = {"skipped": "horovod is not built into this environment (make horovod)"}
            continue
        argv = mpi.mpiexec_command(ranks) + [sys.executable, "-m", allreduce_timing.__name__, str(elements),
                                             str(settings.warmup), str(settings.repeats)]
        env = dict(os.environ, **{mpi.ALLREDUCE_ENV: path})
        for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):  # bench.py itself may run inside an MPI job
            env.pop(name, None)
        done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(allreduce_timing.RESULT_PREFIX)]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"the {path} all-reduce measurement failed (exit {done.returncode}):\n"
                               f"{done.stdout[-3000:]}")
        measured = json.loads(lines[-1][len(allreduce_timing.RESULT_PREFIX):])
        seconds = statistics.median(measured["seconds"])
        result["paths"][path] = {"seconds": seconds, "runs": measured["seconds"],
                                 "bus_bytes_per_second": 2 * (ranks - 1) / ranks * 4 * elements / seconds}
    return result


def check_counts(*, minimum: int, **values):
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"bench.py: --{name} must be an integer >= {minimum}, got {value!r}")


def run(size: str = "small", *, batch: Optional[int] = None, query_length: Optional[int] = None,
        response_length: Optional[int] = None, warmup: int = 1, repeats: int = 3, noptepochs: int = 4,
        growth_steps: int = 2, switches: bool = True, xla: bool = False, mixed_precision: bool = False,
        peak_flops: Optional[float] = None, allreduce_ranks: int = 2, allreduce_elements: Optional[int] = None,
        output: Optional[str] = "bench_results.json",
        log: Callable[[str], None] = print) -> dict:
    """Run every benchmark at one model size; returns the results (also written to `output` as JSON, unless
    None) after printing the table through `log`."""
    if size not in SIZES:
        raise ValueError(f"bench.py: unknown --size {size!r}; known sizes: {', '.join(SIZES)}")
    preset = SIZES[size]
    shape = Shape(batch or preset.batch, query_length or preset.query_length,
                  response_length or preset.response_length)
    check_counts(minimum=1, batch=shape.batch, query_length=shape.query_length,
                 response_length=shape.response_length, repeats=repeats, noptepochs=noptepochs)
    check_counts(minimum=0, warmup=warmup, growth_steps=growth_steps, allreduce_ranks=allreduce_ranks)
    allreduce_elements = GPT2_124M_PARAMETERS if allreduce_elements is None else allreduce_elements
    check_counts(minimum=1, allreduce_elements=allreduce_elements)
    if peak_flops is not None and not float(peak_flops) > 0:
        raise ValueError(f"bench.py: --peak_flops must be a positive number of FLOP/s, got {peak_flops!r}")
    settings = Settings(warmup, repeats, noptepochs, bool(xla), bool(mixed_precision))
    trained_model = preset.make_model()
    model_hparams = trained_model.hparams()
    if shape.query_length + shape.response_length > model_hparams.n_ctx:
        raise ValueError(f"bench.py: --query_length {shape.query_length} + --response_length "
                         f"{shape.response_length} exceed the {size} model's n_ctx {model_hparams.n_ctx}")
    device = device_info(peak_flops, "bfloat16" if settings.mixed_precision else "float32")
    peak = device["peak_flops"]
    results = {
        "config": {"size": size, "model": preset.description, "model_hparams": model_hparams.to_nested_dict(),
                   "batch": shape.batch, "query_length": shape.query_length,
                   "response_length": shape.response_length, "warmup": warmup, "repeats": repeats,
                   "noptepochs": noptepochs, "nminibatches": 1, "xla": settings.xla,
                   "mixed_precision": settings.mixed_precision, "tensorflow": tf.__version__},
        "device": device,
    }
    log(header(results))
    log("  PPO trainer: sampling and updates ...")
    base = measure_ppo(trained_model, shape, settings, peak)
    results["sampling"] = base["sampling"]
    results["ppo_update"] = base["ppo_update"]
    log("  reward model ...")
    results["reward_model"] = measure_reward_model(trained_model, shape, settings, peak)
    results["growth"] = {dimension: growth_rows(trained_model, base, shape, settings, peak, dimension=dimension,
                                                steps=growth_steps, log=log)
                         for dimension in ("batch", "response_length")}
    results["switches"] = {}
    if switches:
        log("  switch: xla ...")
        flipped = measure_ppo(trained_model, shape, settings, peak, xla=not settings.xla)
        off, on = (base, flipped) if not settings.xla else (flipped, base)
        results["switches"]["xla"] = {**switch_entry(off, on), "note": xla_note()}
        if devices.gpu_count() or settings.mixed_precision:
            log("  switch: mixed_precision ...")
            flipped = measure_ppo(trained_model, shape, settings, peak, mixed_precision=not settings.mixed_precision)
            off, on = (base, flipped) if not settings.mixed_precision else (flipped, base)
            results["switches"]["mixed_precision"] = {**switch_entry(off, on), "note": None}
        else:
            results["switches"]["mixed_precision"] = {
                "skipped": "no GPU: bf16 mixed precision is a GPU switch (pass --mixed_precision to measure it "
                           "on this CPU anyway)"}
    if allreduce_ranks:
        log(f"  gradient all-reduce: {allreduce_elements} float32 values over {allreduce_ranks} ranks ...")
    results["allreduce"] = measure_allreduce(allreduce_elements, allreduce_ranks, settings)
    results["memory"] = overall_memory(results)
    log(report(results))
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        log(f"wrote {output}")
    return results


# ----- the table ------------------------------------------------------------------------------------------------

def si(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def header(results: dict) -> str:
    config, device = results["config"], results["device"]
    return (f"bench.py: size {config['size']} ({config['model']}); batch {config['batch']}, query "
            f"{config['query_length']}, response {config['response_length']} tokens; noptepochs "
            f"{config['noptepochs']}; xla {'on' if config['xla'] else 'off'}; mixed precision "
            f"{'on' if config['mixed_precision'] else 'off'}; median of {config['repeats']} after "
            f"{config['warmup']} warm-up\n"
            f"device: {device['kind']} {device['name']} x{device['count']}; peak {si(device['peak_flops'], 'FLOP/s')} "
            f"({device['peak_flops_source']})")


def report(results: dict) -> str:
    """The readable summary of `results`."""
    lines = ["", f"{'stage':<34}{'median s':>10}  {'throughput':<24}{'FLOP':>10}{'FLOP/s':>12}{'MFU':>9}"
                 f"{'peak RSS':>11}"]

    def stage(name, figures, unit, shown):
        lines.append(f"{name:<34}{figures['seconds']:>10.4f}  {si(figures[f'{unit}_per_second'], shown):<24}"
                     f"{si(figures['flops']):>10}{si(figures['flops_per_second']):>12}{percent(figures['mfu']):>9}"
                     f"{si(figures['memory']['host_peak_rss_bytes'], 'B'):>11}")

    stage("sampling (with cache)", results["sampling"], "tokens", "tokens/s")
    stage("reward model forward", results["reward_model"]["forward"], "examples", "examples/s")
    stage(f"reward model train ({REWARD_LABEL_TYPE})", results["reward_model"]["train"], "examples", "labels/s")
    stage("PPO update", results["ppo_update"], "episodes", "episodes/s")
    for part, figures in results["ppo_update"]["parts"].items():
        lines.append(f"  {part:<32}{figures['seconds']:>10.4f}  {percent(figures['share']) + ' of the update':<24}"
                     f"{si(figures['flops']):>10}{'':>12}{percent(figures['mfu']):>9}")
    allreduce = results["allreduce"]
    lines.append(f"gradient all-reduce, {si(allreduce['bytes'], 'B')} ({allreduce['elements']:,} float32) over "
                 f"{allreduce['ranks']} ranks" + (f": skipped, {allreduce['skipped']}" if "skipped" in allreduce else ""))
    for path, figures in allreduce["paths"].items():
        if "skipped" in figures:
            lines.append(f"  {path:<32}  skipped: {figures['skipped']}")
            continue
        share = figures["seconds"] / results["ppo_update"]["seconds"]
        lines.append(f"  {path:<32}{figures['seconds']:>10.4f}  {si(figures['bus_bytes_per_second'], 'B/s') + ' bus':<24}"
                     f"  {share:.2f}x the PPO update's time")
    gpu = results["memory"]["gpu_peak_bytes"]
    lines.append(f"peak host RSS {si(results['memory']['host_peak_rss_bytes'], 'B')}"
                 + ("" if gpu is None else f"; peak GPU memory {si(gpu, 'B')}"))
    for dimension, rows in results["growth"].items():
        lines += ["", f"cost growth of one PPO update, doubling {dimension.replace('_', ' ')}",
                  f"{'batch':>7}{'response':>10}{'seconds':>10}{'x prev':>8}{'episodes/s':>12}{'rollout s':>11}"
                  f"{'epochs s':>10}{'MFU':>9}"]
        for row in rows:
            if "skipped" in row:
                lines.append(f"{row['batch']:>7}{row['response_length']:>10}  skipped: {row['skipped']}")
                continue
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
            lines.append(f"{row['batch']:>7}{row['response_length']:>10}{row['seconds']:>10.4f}{ratio:>8}"
                         f"{row['episodes_per_second']:>12.2f}{row['parts']['rollout']:>11.4f}"
                         f"{row['parts']['ppo_epochs']:>10.4f}{percent(row['mfu']):>9}")
    if results["switches"]:
        lines += ["", "speed switches (seconds off -> on, speedup = off / on)"]
        for name, entry in results["switches"].items():
            if "skipped" in entry:
                lines.append(f"  {name:<16} skipped: {entry['skipped']}")
                continue
            for stage_name in ("sampling", "ppo_update"):
                figures = entry[stage_name]
                lines.append(f"  {name:<16}{stage_name:<12}{figures['off_seconds']:>10.4f} ->"
                             f"{figures['on_seconds']:>9.4f}   x{figures['speedup']:.2f}")
            if entry.get("note"):
                lines.append(f"  {'':<16}note: {entry['note']}")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main, name="bench.py")
