#!/usr/bin/env python3
"""Benchmarks: throughput, model-FLOPs utilisation, memory and cost growth of every stage.

    ./bench.py                                   the `small` CPU size (4 layers, 256 wide)
    ./bench.py --size 124M --batch 4             GPT-2 124M-shaped, random weights (nothing is downloaded)
    ./bench.py --size test --repeats 1 --growth_steps 1 --output /tmp/bench.json
    ./bench.py --size 124M --mixed_precision --xla --peak_flops 989e12
    ./bench.py --size 124M --batch 8 --calibrate    measure the machine's limits only, cached in --output

Models have random weights of the chosen size (`test`, `demo`, `small`, `124M`); every stage is timed after
`warmup` untimed runs (and up to 3 more while the allocator's memory pool is still growing, judged by each run's
page faults), as the median of `repeats` runs:

* sampling: `Policy.respond_op` with the key/value cache, response tokens per second;
* reward model: forward (query + response pairs per second) and one Adam step on best_of_4 labels;
* one PPO update end to end (`train_policy.PPOTrainer.update`), split into its parts;
* model-FLOPs utilisation: FLOPs counted from the shapes (lm_human_preferences/flops.py) / time / peak;
* a roofline of every stage against this machine's measured limits (`--calibrate`: dense matmul FLOP/s at the
  model's sizes and memory bandwidth, per compute dtype on a GPU): compute utilisation, memory utilisation
  (bytes the stage must move, lm_human_preferences/flops.py) and which of the two bounds the stage;
* peak host RSS, and peak GPU memory where there is a GPU;
* cost growth: the PPO update while the batch size doubles, and while the response length doubles;
* speed switches: XLA auto-clustering (`run.xla`) and bf16 mixed precision (`run.mixed_precision`, GPU only);
* the gradient all-reduce: a GPT-2 124M-sized float32 buffer (about 500 MB) averaged over `allreduce_ranks` MPI
  ranks through each path (mpi4py, and horovod where `make horovod` built it), beside the PPO update's time.

A table goes to stdout, everything to the JSON file `--output` (default bench_results.json). The machine's
limits (the `calibration` entry) are measured once: a later run reads them back from `--output` when they were
taken on the same device and TensorFlow, and measures only the matmul sizes still missing.
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

from lm_human_preferences.utils.entry_points import fire_argv, user_errors_in_one_line  # noqa: E402


# ----- the command (first: --help shows it without importing TensorFlow) ----------------------------------------

def main(size: str = "small", batch: int = None, query_length: int = None, response_length: int = None,
         warmup: int = 1, repeats: int = 3, noptepochs: int = 4, growth_steps: int = 2, switches: bool = True,
         xla: bool = False, mixed_precision: bool = False, peak_flops: float = None, allreduce_ranks: int = 2,
         allreduce_elements: int = None, calibrate: bool = False,
         output: str = "bench_results.json"):  # `int = None`: fire's --help shows Optional[int]
    """Benchmark one model size; see the module docstring.

    Args:
        size: test, demo, small or 124M (random weights of that shape)
        batch: episodes per PPO update and labels per reward step (default: the size's)
        query_length: query tokens (default: the size's)
        response_length: response tokens (default: the size's)
        warmup: untimed runs before each measurement (up to 3 more while the memory pool still grows: the
            last run took over 16,384 page faults and under half as many as the run before it)
        repeats: timed runs; the median is reported
        noptepochs: PPO epochs per update (2019 default 4)
        growth_steps: doublings of the batch and of the response length in the cost-growth tables (0: none)
        switches: also measure XLA on/off and (on a GPU, or with --mixed_precision) bf16 on/off
        xla: base setting of run.xla
        mixed_precision: base setting of run.mixed_precision (bf16 compute, float32 weights)
        peak_flops: the device's peak FLOP/s for the MFU (default: a datasheet table or a CPU estimate)
        allreduce_ranks: MPI ranks of the all-reduce measurement (0: skip it)
        allreduce_elements: float32 values all-reduced (default: GPT-2 124M's parameter count, 124,439,808)
        calibrate: measure this machine's limits afresh (matmul FLOP/s at this size and batch, memory
            bandwidth), write them to --output and stop; without it, a benchmark reuses the limits cached there
        output: the JSON file written
    """
    run(str(size), batch=batch, query_length=query_length, response_length=response_length, warmup=warmup,
        repeats=repeats, noptepochs=noptepochs, growth_steps=growth_steps, switches=switches, xla=xla,
        mixed_precision=mixed_precision, peak_flops=peak_flops, allreduce_ranks=allreduce_ranks,
        allreduce_elements=allreduce_elements, calibrate=calibrate, output=output)


if __name__ == "__main__" and fire_argv(sys.argv[1:]) != sys.argv[1:]:  # --help
    fire.Fire(main, command=fire_argv(sys.argv[1:]), name="bench.py")
    sys.exit()

import numpy as np  # noqa: E402

from lm_human_preferences.utils import devices  # noqa: E402

tf = devices.import_tensorflow()  # without its start-up notices

tf.compat.v1.disable_eager_execution()
tf1 = tf.compat.v1

from lm_human_preferences import experiments, flops, label_types, rewards  # noqa: E402
from lm_human_preferences.language import model as lm_model  # noqa: E402
from lm_human_preferences.language.trained_models import TrainedModel  # noqa: E402
from lm_human_preferences.train_policy import PPOTrainer  # noqa: E402
from lm_human_preferences.utils import files, train_ops  # noqa: E402

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


# A stage's first runs fault in the memory its allocator keeps from then on, and on a virtual machine a fresh
# page can cost tens of microseconds: a GPT-2 124M reward-model step (batch 8) took 1.25 million page faults in
# its first run and 291,000 in its second (21.7 s, against 9.5-10 s for each later step, which take about 100).
# So the warm-up goes on past `warmup` runs while the pool is still growing: while the last run took more than
# SETTLED_PAGE_FAULTS and, after the first, fewer than half the faults of the run before it; at most
# WARMUP_MAX_EXTRA more runs. A stage that faults in about as much every run has settled: its allocator maps
# that memory afresh each time (a PPO update, about 40,000 faults from its training steps; TensorFlow's allocator
# without oneDNN, every large tensor). Faults, not bytes: with transparent huge pages one fault maps 2 MB.
SETTLED_PAGE_FAULTS = 16_384  # 64 MB in 4 KB pages
WARMUP_MAX_EXTRA = 3


class TimedRuns(list):
    """[(seconds, result)] of the timed runs; `warmup_page_faults`: the page faults of each untimed run before
    them."""

    def __init__(self, runs, warmup_page_faults: List[int]):
        super().__init__(runs)
        self.warmup_page_faults = warmup_page_faults


def page_faults(fn: Callable) -> int:
    """The minor page faults of this process while `fn` runs: pages mapped in without a disk read, which for a
    TensorFlow run means memory newly taken from the system."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def pool_still_growing(warmup_faults: List[int]) -> bool:
    """Whether the last warm-up run still grew the memory pool: more than SETTLED_PAGE_FAULTS faults and, after the
    first run, fewer than half those of the run before it (False with no run)."""
    if not warmup_faults or warmup_faults[-1] <= SETTLED_PAGE_FAULTS:
        return False
    return len(warmup_faults) == 1 or warmup_faults[-1] < warmup_faults[-2] / 2


def timed_runs(fn: Callable, settings: Settings) -> TimedRuns:
    """[(seconds, fn's result)] of `repeats` runs after `warmup` untimed ones, and after up to WARMUP_MAX_EXTRA
    more while the memory pool is still growing (above)."""
    warmup_faults = [page_faults(fn) for _ in range(settings.warmup)]
    while pool_still_growing(warmup_faults) and len(warmup_faults) < settings.warmup + WARMUP_MAX_EXTRA:
        warmup_faults.append(page_faults(fn))
    runs = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    return TimedRuns(runs, warmup_faults)


@dataclass(frozen=True)
class Ceilings:
    """What a stage is compared with: the datasheet-style peak (for the MFU) and this machine's measured dense
    matmul FLOP/s (in the stage's compute dtype) and memory bandwidth (for the roofline); None: unknown."""
    peak_flops: Optional[float]
    matmul_flops_per_second: Optional[Dict[str, float]] = None  # {compute dtype: FLOP/s}
    bytes_per_second: Optional[float] = None

    def matmul(self, dtype: str) -> Optional[float]:
        rates = self.matmul_flops_per_second or {}
        return rates.get(dtype, rates.get("float32"))


def rate(runs: TimedRuns, flop_count, ceilings: Ceilings, byte_count: Optional[int] = None, dtype: str = "float32",
         **counts) -> dict:
    """Throughput figures of a stage whose timed `runs` each handled `counts` (e.g. tokens=...), did
    `flop_count` FLOPs and had to move `byte_count` bytes: median seconds, {unit}_per_second, FLOP/s, the
    model-FLOPs utilisation (None without a known peak) and the roofline (flops.roofline) with a byte count."""
    seconds = float(statistics.median(run_seconds for run_seconds, _ in runs))
    achieved = flop_count / seconds
    peak = ceilings.peak_flops
    figures = {"seconds": seconds, "repeats_seconds": [run_seconds for run_seconds, _ in runs],
               **{f"{unit}_per_second": count / seconds for unit, count in counts.items()},
               "flops": int(flop_count), "flops_per_second": achieved, "mfu": None if not peak else achieved / peak,
               "warmup_page_faults": runs.warmup_page_faults}
    if byte_count is not None:
        figures["roofline"] = stage_roofline(flop_count, byte_count, seconds, ceilings, dtype)
    return figures


def stage_roofline(flop_count, byte_count, seconds, ceilings: Ceilings, dtype: str) -> dict:
    """flops.roofline against the matmul FLOP/s measured in the stage's compute `dtype`."""
    return flops.roofline(flop_count=flop_count, byte_count=byte_count, seconds=seconds,
                          matmul_flops_per_second=ceilings.matmul(dtype), bytes_per_second=ceilings.bytes_per_second)


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


# ----- calibration: this machine's measured limits --------------------------------------------------------------

# The array read and copied to measure memory bandwidth: 8x the largest last-level caches of common CPUs.
BANDWIDTH_ARRAY_BYTES = 256 * 2 ** 20
# A timed run of a calibration op repeats it until it lasts this long (tiny matmuls take microseconds).
CALIBRATION_MIN_SECONDS = 0.05


def calibration_dtypes(device: dict) -> List[str]:
    """The compute dtypes whose matmuls are measured: float32, and on a GPU (or with mixed precision) bfloat16."""
    return ["float32"] + (["bfloat16"] if device["kind"] == "gpu" or device["compute_dtype"] == "bfloat16" else [])


def matmul_shapes(hparams, tokens: int) -> List[List[int]]:
    """[m, k, n] of the model's matmuls on `tokens` positions at once (a training or scoring pass): QKV,
    attention projection, MLP in and out, the tied output layer."""
    e = hparams.n_embd
    shapes = [[tokens, e, 3 * e], [tokens, e, e], [tokens, e, 4 * e], [tokens, 4 * e, e], [tokens, e, hparams.n_vocab]]
    return [list(shape) for shape in dict.fromkeys(map(tuple, shapes))]  # distinct, in order


# Timed runs of each calibration op, at least: the limit is the best of them (the fastest run is what the
# machine can do; slower ones met other work on a shared machine).
CALIBRATION_REPEATS = 5


def time_op(sess, op, settings: Settings) -> List[float]:
    """Seconds per run of `op` (fetched as an op: nothing is copied out), each the mean of enough back-to-back
    runs to last CALIBRATION_MIN_SECONDS, max(repeats, CALIBRATION_REPEATS) times, after `warmup` (at least
    one) untimed runs."""
    for _ in range(max(1, settings.warmup)):
        sess.run(op)
    start = time.perf_counter()
    sess.run(op)
    number = max(1, int(np.ceil(CALIBRATION_MIN_SECONDS / max(time.perf_counter() - start, 1e-9))))
    runs = []
    for _ in range(max(settings.repeats, CALIBRATION_REPEATS)):
        start = time.perf_counter()
        for _ in range(number):
            sess.run(op)
        runs.append((time.perf_counter() - start) / number)
    return runs


def measure_matmul(m: int, k: int, n: int, dtype: str, settings: Settings) -> dict:
    """Dense [m, k] x [k, n] matmul FLOP/s (2·m·k·n FLOPs) in `dtype`, inputs in variables; seconds: the
    fastest of the timed runs."""
    with tf.Graph().as_default():
        a = tf1.get_variable("a", [m, k], tf.float32, tf1.random_normal_initializer())
        b = tf1.get_variable("b", [k, n], tf.float32, tf1.random_normal_initializer())
        a_in, b_in = tf.cast(a, dtype), tf.cast(b, dtype)
        if dtype != "float32":  # cast once, outside the timed op: the calibration times the matmul alone
            a_in, b_in = tf1.Variable(a_in, trainable=False), tf1.Variable(b_in, trainable=False)
        product = tf.matmul(a_in, b_in)
        with devices.new_session() as sess:
            # a and b first: the cast copies' initial values read them (one run of every initializer together
            # would race the copies against their sources)
            sess.run([a.initializer, b.initializer])
            if dtype != "float32":
                sess.run([a_in.initializer, b_in.initializer])
            runs = time_op(sess, product.op, settings)
    seconds = float(min(runs))
    return {"dtype": dtype, "shape": [m, k, n], "seconds": seconds, "repeats_seconds": runs,
            "flops_per_second": 2 * m * k * n / seconds}


def measure_bandwidth(nbytes: int, settings: Settings) -> dict:
    """Memory bandwidth: a sum over a float32 array of `nbytes` (reads it once) and a scaled copy of it (x · s
    with s a variable, which no graph rewrite removes: reads the array and writes a new one, 2·nbytes moved).
    Each rate is that of the fastest run; `bytes_per_second` is the larger of the two."""
    elements = nbytes // 4
    with tf.Graph().as_default():
        x = tf1.get_variable("x", [elements], tf.float32, tf1.ones_initializer())
        scale = tf1.get_variable("scale", [], tf.float32, tf1.ones_initializer())
        value = tf.convert_to_tensor(x)
        read, copy = tf.reduce_sum(value), value * scale
        with devices.new_session() as sess:
            sess.run(tf1.global_variables_initializer())
            read_runs = time_op(sess, read.op, settings)
            copy_runs = time_op(sess, copy.op, settings)
    read_rate = elements * 4 / min(read_runs)
    copy_rate = 2 * elements * 4 / min(copy_runs)
    return {"array_bytes": elements * 4, "read_bytes_per_second": read_rate, "read_repeats_seconds": read_runs,
            "copy_bytes_per_second": copy_rate, "copy_repeats_seconds": copy_runs,
            "bytes_per_second": max(read_rate, copy_rate), "from": "read" if read_rate >= copy_rate else "copy"}


def calibration_key(device: dict) -> dict:
    """What the measured limits belong to: a cached calibration is reused only on the same device and
    TensorFlow."""
    return {"kind": device["kind"], "name": device["name"], "count": device["count"], "tensorflow": tf.__version__}


def read_cached_calibration(path: Optional[str]) -> Optional[dict]:
    """The `calibration` entry of an earlier bench JSON at `path`, or None (no file, none in it, unreadable)."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            cached = json.load(f).get("calibration")
    except (OSError, ValueError, AttributeError):
        return None
    return cached if isinstance(cached, dict) else None


def calibrate_machine(device: dict, model_hparams, shape: Shape, settings: Settings, cached: Optional[dict],
                      log) -> dict:
    """This machine's limits: dense matmul FLOP/s at the model's sizes (`tokens` = batch x (query + response)
    positions) in each compute dtype, and memory bandwidth. Figures in `cached` taken on the same device and
    TensorFlow are reused; only what is missing is measured.

    matmul_flops_per_second {dtype: the best of this batch's sizes}: the reference of the compute utilisation."""
    key = calibration_key(device)
    usable = cached if cached and cached.get("key") == key else None
    tokens = shape.batch * (shape.query_length + shape.response_length)
    matmuls = [entry for entry in (usable or {}).get("matmuls", []) if isinstance(entry, dict)]
    reused = 0
    for dtype in calibration_dtypes(device):
        for m, k, n in matmul_shapes(model_hparams, tokens):
            if any(entry.get("dtype") == dtype and entry.get("shape") == [m, k, n] for entry in matmuls):
                reused += 1
                continue
            log(f"  calibration: {dtype} matmul [{m}, {k}] x [{k}, {n}] ...")
            matmuls.append(measure_matmul(m, k, n, dtype, settings))
    memory = (usable or {}).get("memory")
    if memory is None:
        log(f"  calibration: memory bandwidth ({si(BANDWIDTH_ARRAY_BYTES, 'B')} read and copied) ...")
        memory = measure_bandwidth(BANDWIDTH_ARRAY_BYTES, settings)
    best = {}  # over this size and batch's matmuls (the cache may also hold other batches')
    needed = matmul_shapes(model_hparams, tokens)
    for entry in matmuls:
        if entry["shape"] in needed:
            best[entry["dtype"]] = max(best.get(entry["dtype"], 0.0), entry["flops_per_second"])
    return {"key": key, "tf32": device["kind"] == "gpu" and tf.config.experimental.tensor_float_32_execution_enabled(),
            "matmuls": matmuls, "matmul_flops_per_second": best, "memory": memory,
            "bytes_per_second": memory["bytes_per_second"],
            "reused": f"{reused} matmul sizes{' and the bandwidth' if usable and usable.get('memory') else ''} "
                      f"cached in the output file" if usable else None}


def limits(calibration: Optional[dict], compute_dtype: str) -> dict:
    """{matmul_flops_per_second, bytes_per_second} for a stage computing in `compute_dtype` (None: unknown)."""
    if not calibration:
        return {"matmul_flops_per_second": None, "bytes_per_second": None}
    rates = calibration["matmul_flops_per_second"]
    return {"matmul_flops_per_second": rates.get(compute_dtype, rates.get("float32")),
            "bytes_per_second": calibration["bytes_per_second"]}


# ----- PPO: sampling and whole updates --------------------------------------------------------------------------

def ppo_hparams(shape: Shape, settings: Settings, *, xla: bool, mixed_precision: bool):
    """The `test` policy experiment reshaped: this batch, query and response length, one update, no saving."""
    return experiments.resolve_hparams("train_policy", "test", "bench", overrides={
        "task.query_length": shape.query_length, "task.response_length": shape.response_length,
        "rewards.train_new_model": "off", "rewards.trained_model": "random weights (bench.py)",
        "ppo.batch_size": shape.batch, "ppo.total_episodes": shape.batch, "ppo.noptepochs": settings.noptepochs,
        "ppo.nminibatches": 1, "ppo.micro_batches": 1, "ppo.lr": 1e-5,
        "ppo.whiten_rewards": shape.batch >= 8,  # whitening needs 8 episodes; the CPU rows time batches of 2
        "run.xla": xla, "run.mixed_precision": mixed_precision, "run.seed": 1})


def random_tokens(rng, n_vocab, *shape):
    return rng.randint(0, n_vocab, size=shape).astype(np.int32)


def sampling_split(trainer, feed, rollout_runs, model_hparams, shape: Shape, context_length: int,
                   settings: Settings, ceilings: Ceilings, dtype: str, dtype_bytes: int) -> dict:
    """The rollout in its two kinds of work: the context pass (one model call over the whole context, which a
    one-token rollout times) and the token steps (one cached call per further token, each reading every
    weight once): their seconds (the steps' = rollout - context pass), FLOPs, bytes and rooflines."""
    context_op = trainer.policy.respond_op(trainer.queries, 1, seed=trainer.rollout_seed)
    runs = timed_runs(lambda: trainer.sess.run(context_op, feed), settings)
    counts = dict(batch=shape.batch, context_length=context_length)
    context = rate(runs, flops.sampling_flops(model_hparams, response_length=1, **counts), ceilings,
                   flops.sampling_bytes(model_hparams, response_length=1, dtype_bytes=dtype_bytes, **counts), dtype)
    steps_count = shape.response_length - 1
    if not steps_count:
        return {"context_pass": context, "token_steps": None, "seconds_per_token_step": None}
    seconds = max(float(statistics.median(seconds for seconds, _ in rollout_runs)) - context["seconds"], 1e-9)
    step_flops = (flops.sampling_flops(model_hparams, response_length=shape.response_length, **counts)
                  - context["flops"])
    step_bytes = (flops.sampling_bytes(model_hparams, response_length=shape.response_length,
                                       dtype_bytes=dtype_bytes, **counts) - context["roofline"]["bytes"])
    steps = {"steps": steps_count, "seconds": seconds, "flops": step_flops, "flops_per_second": step_flops / seconds,
             "roofline": stage_roofline(step_flops, step_bytes, seconds, ceilings, dtype)}
    return {"context_pass": context, "token_steps": steps, "seconds_per_token_step": seconds / steps_count}


def measure_ppo(trained_model: TrainedModel, shape: Shape, settings: Settings, ceilings: Ceilings, *, xla=None,
                mixed_precision=None, sampling=True) -> dict:
    """Build a PPOTrainer (policy, reference policy and reward model from `trained_model`) and time sampling
    (optional) and whole PPO updates."""
    xla = settings.xla if xla is None else xla
    mixed_precision = settings.mixed_precision if mixed_precision is None else mixed_precision
    hparams = ppo_hparams(shape, settings, xla=xla, mixed_precision=mixed_precision)
    model_hparams = trained_model.hparams()
    dtype = "bfloat16" if mixed_precision else "float32"
    dtype_bytes = 2 if mixed_precision else flops.FLOAT32_BYTES
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
                sample_bytes = flops.sampling_bytes(model_hparams, batch=shape.batch,
                                                    context_length=context_length,
                                                    response_length=shape.response_length, dtype_bytes=dtype_bytes)
                results["sampling"] = rate(runs, sample_flops, ceilings, sample_bytes, dtype,
                                           tokens=shape.batch * shape.response_length)
                results["sampling"].update(sampling_split(trainer, feed, runs, model_hparams, shape, context_length,
                                                          settings, ceilings, dtype, dtype_bytes))
                results["sampling"]["memory"] = memory_after_stage()
            runs = timed_runs(lambda: trainer.update(queries, 0)[1]["timings"], settings)
        finally:
            trainer.sess.close()
    part_flops = flops.ppo_update_flops(model_hparams, model_hparams, batch=shape.batch,
                                        context_length=context_length, query_length=shape.query_length,
                                        response_length=shape.response_length, noptepochs=settings.noptepochs)
    part_bytes = flops.ppo_update_bytes(model_hparams, model_hparams, batch=shape.batch,
                                        context_length=context_length, query_length=shape.query_length,
                                        response_length=shape.response_length, noptepochs=settings.noptepochs,
                                        dtype_bytes=dtype_bytes)
    update = rate(runs, sum(part_flops.values()), ceilings, sum(part_bytes.values()), dtype,
                  episodes=shape.batch)
    update["parts"] = {}
    peak = ceilings.peak_flops
    for part in PPO_PARTS:
        seconds = float(statistics.median(timings[part] for _, timings in runs))
        update["parts"][part] = {"seconds": seconds, "share": seconds / update["seconds"], "flops": part_flops[part],
                                 "mfu": None if not peak or not part_flops[part] else
                                 part_flops[part] / seconds / peak}
        if part_bytes[part]:
            update["parts"][part]["roofline"] = stage_roofline(part_flops[part], part_bytes[part], seconds,
                                                                    ceilings, dtype)
    update["memory"] = memory_after_stage()
    results["ppo_update"] = update
    return results


# ----- reward model ---------------------------------------------------------------------------------------------

def measure_reward_model(trained_model: TrainedModel, shape: Shape, settings: Settings, ceilings: Ceilings) -> dict:
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
        reward_model = rewards.RewardModel(trained_model, scope="reward_model", compute_dtype=compute_dtype)
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
    dtype = "bfloat16" if settings.mixed_precision else "float32"
    dtype_bytes = 2 if settings.mixed_precision else flops.FLOAT32_BYTES
    forward = rate(forward_runs, flops.reward_flops(model_hparams, batch=shape.batch, **shapes), ceilings,
                   flops.reward_bytes(model_hparams, batch=shape.batch, dtype_bytes=dtype_bytes, **shapes), dtype,
                   examples=shape.batch)  # an example: one query + response
    forward["memory"] = forward_memory
    train = rate(train_runs, flops.reward_training_flops(
        model_hparams, batch=shape.batch, num_samples=label_type.num_samples, **shapes), ceilings,
        flops.reward_training_bytes(model_hparams, batch=shape.batch, num_samples=label_type.num_samples,
                                    dtype_bytes=dtype_bytes, **shapes), dtype,
        examples=shape.batch)  # an example: one label, a query and its 4 responses
    train["memory"] = memory_after_stage()
    return {"label_type": REWARD_LABEL_TYPE, "forward": forward, "train": train}


# ----- cost growth and switches ---------------------------------------------------------------------------------

def growth_rows(trained_model, base: dict, shape: Shape, settings: Settings, ceilings: Ceilings, *, dimension: str,
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
        rows.append(measure_ppo(trained_model, bigger, settings, ceilings, sampling=False))
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


def flag(name: str, value) -> bool:
    """A switch from the command line: fire gives True/False for --x, --nox and --x=True, but the text 'false' for
    --x false, which must not count as on."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"bench.py: --{name} is a switch (--{name}, --no{name}, --{name} true|false), got {value!r}")


def check_counts(*, minimum: int, **values):
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"bench.py: --{name} must be an integer >= {minimum}, got {value!r}")


def run(size: str = "small", *, batch: Optional[int] = None, query_length: Optional[int] = None,
        response_length: Optional[int] = None, warmup: int = 1, repeats: int = 3, noptepochs: int = 4,
        growth_steps: int = 2, switches: bool = True, xla: bool = False, mixed_precision: bool = False,
        peak_flops: Optional[float] = None, allreduce_ranks: int = 2, allreduce_elements: Optional[int] = None,
        calibrate: bool = False, output: Optional[str] = "bench_results.json",
        log: Callable[[str], None] = print) -> dict:
    """Run every benchmark at one model size; returns the results (also written to `output` as JSON, unless
    None) after printing the table through `log`. The machine's limits are those cached in `output` (same
    device and TensorFlow), measured where missing; with `calibrate`, they are measured afresh and nothing
    else is run (the results then hold `config`, `device` and `calibration` only)."""
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
    switches, calibrate = flag("switches", switches), flag("calibrate", calibrate)
    settings = Settings(warmup, repeats, noptepochs, flag("xla", xla), flag("mixed_precision", mixed_precision))
    trained_model = preset.make_model()
    model_hparams = trained_model.hparams()
    if shape.query_length + shape.response_length > model_hparams.n_ctx:
        raise ValueError(f"bench.py: --query_length {shape.query_length} + --response_length "
                         f"{shape.response_length} exceed the {size} model's n_ctx {model_hparams.n_ctx}")
    device = device_info(peak_flops, "bfloat16" if settings.mixed_precision else "float32")
    results = {
        "config": {"size": size, "model": preset.description, "model_hparams": model_hparams.to_nested_dict(),
                   "batch": shape.batch, "query_length": shape.query_length,
                   "response_length": shape.response_length, "warmup": warmup, "repeats": repeats,
                   "noptepochs": noptepochs, "nminibatches": 1, "xla": settings.xla,
                   "mixed_precision": settings.mixed_precision, "tensorflow": tf.__version__},
        "device": device,
    }
    log(header(results))
    cached = None if calibrate else read_cached_calibration(output)
    calibration = calibrate_machine(device, model_hparams, shape, settings, cached, log)
    results["calibration"] = calibration
    if calibrate:
        log(calibration_report(calibration))
        write_results(results, output, log)
        return results
    ceilings = Ceilings(device["peak_flops"], calibration["matmul_flops_per_second"],
                        calibration["bytes_per_second"])
    log("  PPO trainer: sampling and updates ...")
    base = measure_ppo(trained_model, shape, settings, ceilings)
    results["sampling"] = base["sampling"]
    results["ppo_update"] = base["ppo_update"]
    log("  reward model ...")
    results["reward_model"] = measure_reward_model(trained_model, shape, settings, ceilings)
    results["growth"] = {dimension: growth_rows(trained_model, base, shape, settings, ceilings, dimension=dimension,
                                                steps=growth_steps, log=log)
                         for dimension in ("batch", "response_length")}
    results["switches"] = {}
    if switches:
        log("  switch: xla ...")
        flipped = measure_ppo(trained_model, shape, settings, ceilings, xla=not settings.xla)
        off, on = (base, flipped) if not settings.xla else (flipped, base)
        results["switches"]["xla"] = {**switch_entry(off, on), "note": xla_note()}
        if devices.gpu_count() or settings.mixed_precision:
            log("  switch: mixed_precision ...")
            flipped = measure_ppo(trained_model, shape, settings, ceilings,
                                  mixed_precision=not settings.mixed_precision)
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
    write_results(results, output, log)
    return results


def write_results(results: dict, output: Optional[str], log):
    if output:
        files.write_text_atomic(output, json.dumps(results, indent=2) + "\n")
        log(f"wrote {output}")


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
            f"{config['warmup']} warm-up (up to {WARMUP_MAX_EXTRA} more while the memory pool grows)\n"
            f"device: {device['kind']} {device['name']} x{device['count']}; peak {si(device['peak_flops'], 'FLOP/s')} "
            f"({device['peak_flops_source']})")


def calibration_report(calibration: dict) -> str:
    """The measured limits: each matmul size and dtype, the best per dtype, and the memory bandwidth."""
    lines = ["", "this machine's measured limits" + (f" ({calibration['reused']})" if calibration["reused"] else "")]
    for entry in calibration["matmuls"]:
        m, k, n = entry["shape"]
        lines.append(f"  {entry['dtype']:<9} matmul [{m}, {k}] x [{k}, {n}]{'':<4}{si(entry['flops_per_second'], 'FLOP/s')}")
    for dtype, value in calibration["matmul_flops_per_second"].items():
        lines.append(f"  {dtype:<9} matmul, best of these sizes: {si(value, 'FLOP/s')}")
    memory = calibration["memory"]
    lines.append(f"  memory bandwidth {si(memory['bytes_per_second'], 'B/s')} (read {si(memory['read_bytes_per_second'], 'B/s')},"
                 f" copy {si(memory['copy_bytes_per_second'], 'B/s')}, {si(memory['array_bytes'], 'B')} array); "
                 f"ridge point {calibration_ridge(calibration):.1f} FLOP/byte")
    return "\n".join(lines)


def calibration_ridge(calibration: dict) -> float:
    """FLOP per byte above which a float32 stage is compute-bound on this machine."""
    return calibration["matmul_flops_per_second"]["float32"] / calibration["bytes_per_second"]


def roofline_rows(results: dict):
    """(name, figures) of every stage that has a roofline."""
    yield "sampling (rollout)", results["sampling"]
    yield "  context pass", results["sampling"]["context_pass"]
    if results["sampling"]["token_steps"]:
        yield "  token steps", results["sampling"]["token_steps"]
    for part in ("ref_logprobs", "score", "ppo_epochs"):
        yield f"PPO {part}", results["ppo_update"]["parts"][part]
    yield "PPO update (whole)", results["ppo_update"]
    yield "reward model forward", results["reward_model"]["forward"]
    yield "reward model train", results["reward_model"]["train"]


def roofline_report(results: dict) -> List[str]:
    lines = ["", "roofline against the measured limits (utilisation = model FLOP/s / matmul FLOP/s, bytes that must "
                 "move / s / bandwidth)",
             f"{'stage':<24}{'seconds':>9}{'FLOP/s':>11}{'compute':>9}{'bytes/s':>11}{'memory':>9}{'FLOP/B':>8}"
             f"{'bound':>9}{'of bound':>10}"]
    for name, figures in roofline_rows(results):
        roof = figures.get("roofline")
        if roof is None:
            continue
        flop_rate = figures["flops"] / figures["seconds"]
        intensity = "-" if roof["arithmetic_intensity"] is None else f"{roof['arithmetic_intensity']:.1f}"
        lines.append(f"{name:<24}{figures['seconds']:>9.4f}{si(flop_rate):>11}{percent(roof['compute_utilisation']):>9}"
                     f"{si(roof['bytes_per_second'], 'B'):>11}{percent(roof['memory_utilisation']):>9}{intensity:>8}"
                     f"{roof['bound'] or '-':>9}{percent(roof['bound_utilisation']):>10}")
    steps = results["sampling"]["token_steps"]
    if steps:
        lines.append(f"sampling: {steps['seconds'] / steps['steps'] * 1e3:.1f} ms per token step (rollout minus a "
                     f"one-token rollout, over {steps['steps']} steps)")
    return lines


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
    lines.append(calibration_report(results["calibration"]))
    lines += roofline_report(results)
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
    with user_errors_in_one_line():  # a bad flag: one line, before anything is measured or written
        fire.Fire(main, name="bench.py")
