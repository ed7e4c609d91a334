"""bench.py end to end on the `test` size; FLOP counts (lm_human_preferences/flops.py) against a hand
computation and against TensorFlow's own FLOP statistics of the graph; device peaks; and the bf16
mixed-precision switch of the model (close to float32, float32 where it has to be)."""

import importlib.util
import json
import mmap
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from tensorflow.python.framework import ops as tf_ops

from lm_human_preferences import flops
from lm_human_preferences.language import model as lm_model
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench  # noqa: E402

HP = lm_model.HParams(n_vocab=10, n_ctx=16, n_embd=4, n_head=2, n_layer=2)
PAD = 27  # the `test` encoding's padding token


# ----- FLOP counts ----------------------------------------------------------------------------------------------

def test_forward_flops_match_a_hand_computation():
    # batch 3, 5 tokens, logits at all 5 positions, one scalar head; n_embd 4, 2 heads of size 2, n_vocab 10.
    # Per layer and sequence, each matmul as [m, k] x [k, n] = 2·m·k·n FLOPs:
    qkv = 2 * 5 * 4 * 12  # [5, 4] x [4, 12] = 480
    attn_proj = 2 * 5 * 4 * 4  # [5, 4] x [4, 4] = 160
    mlp_fc = 2 * 5 * 4 * 16  # [5, 4] x [4, 16] = 640
    mlp_proj = 2 * 5 * 16 * 4  # [5, 16] x [16, 4] = 640
    scores = 2 * (2 * 5 * 2 * 5)  # 2 heads x [5, 2] x [2, 5] = 200
    values = 2 * (2 * 5 * 5 * 2)  # 2 heads x [5, 5] x [5, 2] = 200
    per_layer = qkv + attn_proj + mlp_fc + mlp_proj + scores + values  # 2320
    logits = 2 * 5 * 4 * 10  # [5, 4] x [4, 10] = 400
    head = 2 * 5 * 4  # [5, 4] x [4, 1] = 40
    expected = 3 * (2 * per_layer + logits + head)  # 3 x 5080 = 15240
    assert expected == 15240
    assert flops.forward_flops(HP, batch=3, tokens=5, logits=5, scalar_heads=1) == expected


def test_sampling_flops_match_a_hand_computation():
    # Context 3, response 3, batch 1: the context in one call (keys 3), then two cached steps (keys 4, then 5);
    # each call computes one position's logits and the value head at its positions.
    def layer(tokens, keys):
        return tokens * 2 * 12 * 4 * 4 + tokens * 2 * 2 * 4 * keys  # 24·e² + 4·e·keys per token
    first = 2 * layer(3, 3) + 2 * 4 * 10 + 3 * 2 * 4  # 2592 + 80 + 24 = 2696
    step1 = 2 * layer(1, 4) + 2 * 4 * 10 + 2 * 4  # 896 + 80 + 8 = 984
    step2 = 2 * layer(1, 5) + 2 * 4 * 10 + 2 * 4  # 928 + 80 + 8 = 1016
    assert first + step1 + step2 == 4696
    assert flops.sampling_flops(HP, batch=1, context_length=3, response_length=3) == 4696


def test_ppo_update_flops_are_its_parts():
    parts = flops.ppo_update_flops(HP, HP, batch=2, context_length=4, query_length=3, response_length=3,
                                   noptepochs=4)
    analyze = flops.forward_flops(HP, batch=2, tokens=4 + 3 - 1, logits=3, scalar_heads=1)
    assert parts == {
        "rollout": flops.sampling_flops(HP, batch=2, context_length=4, response_length=3),
        "ref_logprobs": analyze,
        "score": flops.forward_flops(HP, batch=2, tokens=3 + 3, scalar_heads=1),  # no logits, bare query
        "ppo_epochs": 4 * 3 * analyze,  # forward + backward (2x) per epoch
        "stats": 0,
    }
    assert flops.reward_training_flops(HP, batch=2, num_samples=4, query_length=3, response_length=3) == \
        3 * 4 * parts["score"]


def graph_matmul_flops(graph):
    """TensorFlow's registered FLOP statistics of the graph's matmuls (an independent count)."""
    return sum(int(tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0)
               for op in graph.get_operations() if op.type in ("MatMul", "BatchMatMulV2"))


@pytest.mark.parametrize("past_length", [0, 6])
def test_flop_counts_equal_tensorflows_statistics_of_the_graph(past_length):
    graph = tf.get_default_graph()
    model = lm_model.Model(HP, scalar_heads=["value"])
    past = tf.zeros(lm_model.past_shape(HP, 3, past_length)) if past_length else None
    tokens = 1 if past_length else 5
    outputs = model(tf.zeros([3, tokens], tf.int32), past=past, logits_for_last=1 if past_length else 2)
    forward = graph_matmul_flops(graph)
    assert forward == flops.forward_flops(HP, batch=3, tokens=tokens, keys=past_length + tokens,
                                          logits=1 if past_length else 2, scalar_heads=1)
    if not past_length:
        # backward = 2 x forward: every matmul's gradient takes two matmuls of the same size. (Only without a
        # cache: TensorFlow's statistics ignore BatchMatMul's adj_x, which gradients of non-square scores use.)
        tf.gradients(tf.reduce_sum(outputs["lm_logits"]) + tf.reduce_sum(outputs["value"]), model.get_params())
        assert graph_matmul_flops(graph) - forward == 2 * forward


# ----- device peaks ---------------------------------------------------------------------------------------------

CPUINFO = """processor\t: 0
model name\t: Some CPU
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse sse2 avx fma avx2
"""


def test_cpu_peak_is_cores_times_clock_times_flops_per_cycle():
    peak, assumptions = flops.cpu_peak_flops(CPUINFO, cores=2)
    assert peak == 2 * 2.0e9 * 32  # AVX2 + FMA: 8 lanes x 2 (FMA) x 2 units
    assert "2 cores" in assumptions and "2.00 GHz" in assumptions
    peak, _ = flops.cpu_peak_flops(CPUINFO.replace("avx2", "avx2 avx512f"), cores=1)
    assert peak == 2.0e9 * 64
    peak, why = flops.cpu_peak_flops("processor : 0\n", cores=4)
    assert peak is None and "--peak_flops" in why


def test_gpu_peaks_by_name_and_dtype():
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype="bfloat16", tf32=True)[0] == 312e12
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype="float32", tf32=True)[0] == 156e12
    assert flops.gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype="float32", tf32=False)[0] == 19.5e12
    assert flops.gpu_peak_flops("NVIDIA A10G", dtype="bfloat16", tf32=True)[0] == 125e12  # not an A100
    assert flops.gpu_peak_flops("NVIDIA H100 PCIe", dtype="bfloat16", tf32=True)[0] == 756e12
    assert flops.gpu_peak_flops("NVIDIA H100 80GB HBM3", dtype="bfloat16", tf32=True)[0] == 989.4e12
    assert flops.gpu_peak_flops("Tesla V100-SXM2-16GB", dtype="bfloat16", tf32=True)[0] == 15.7e12  # no bf16 cores
    peak, why = flops.gpu_peak_flops("Mystery GPU", dtype="float32", tf32=True)
    assert peak is None and "--peak_flops" in why


# ----- the benchmark end to end -----------------------------------------------------------------------------------

STAGE_FIELDS = {"seconds", "repeats_seconds", "flops", "flops_per_second", "mfu", "memory", "warmup_page_faults"}
MEMORY_FIELDS = {"host_peak_rss_bytes", "gpu_peak_bytes"}


def test_benchmark_runs_on_the_test_size_and_its_json_has_every_field(tmp_path):
    output = tmp_path / "bench.json"
    lines = []
    # mixed_precision on: the bf16 PPO update and reward training run, and the switch is measured on a CPU too
    returned = bench.run("test", warmup=0, repeats=1, noptepochs=1, growth_steps=1, mixed_precision=True,
                         allreduce_elements=1000, output=str(output), log=lines.append)
    results = json.loads(output.read_text())
    assert results == json.loads(json.dumps(returned))
    assert set(results) == {"config", "device", "calibration", "sampling", "ppo_update", "reward_model", "growth",
                            "switches", "allreduce", "memory"}
    config = results["config"]
    assert {"size", "model", "model_hparams", "batch", "query_length", "response_length", "warmup", "repeats",
            "noptepochs", "nminibatches", "xla", "mixed_precision", "tensorflow"} <= set(config)
    B, Q, R = config["batch"], config["query_length"], config["response_length"]
    assert (B, Q, R) == (8, 2, 2) and config["mixed_precision"] is True
    device = results["device"]
    assert set(device) == {"kind", "name", "count", "compute_dtype", "peak_flops", "peak_flops_source"}
    assert device["compute_dtype"] == "bfloat16"

    hparams = TrainedModel("test").hparams()
    sampling = results["sampling"]
    assert STAGE_FIELDS | {"tokens_per_second", "roofline", "seconds_per_token_step", "context_pass",
                           "token_steps"} == set(sampling)
    assert sampling["tokens_per_second"] == pytest.approx(B * R / sampling["seconds"])
    assert sampling["flops"] == flops.sampling_flops(hparams, batch=B, context_length=Q, response_length=R)
    assert set(sampling["memory"]) == MEMORY_FIELDS and sampling["memory"]["host_peak_rss_bytes"] > 0

    update = results["ppo_update"]
    assert STAGE_FIELDS | {"episodes_per_second", "parts", "roofline"} == set(update)
    assert update["episodes_per_second"] == pytest.approx(B / update["seconds"])
    assert list(update["parts"]) == ["rollout", "ref_logprobs", "score", "ppo_epochs", "stats"]
    expected_parts = flops.ppo_update_flops(hparams, hparams, batch=B, context_length=Q, query_length=Q,
                                            response_length=R, noptepochs=1)
    for part, figures in update["parts"].items():
        assert set(figures) == {"seconds", "share", "flops", "mfu"} | ({"roofline"} if part != "stats" else set())
        assert figures["flops"] == expected_parts[part]
        assert 0 < figures["seconds"] <= update["seconds"]
    assert sum(p["seconds"] for p in update["parts"].values()) <= update["seconds"]
    assert update["flops"] == sum(expected_parts.values())
    if device["peak_flops"]:
        assert update["mfu"] == pytest.approx(update["flops"] / update["seconds"] / device["peak_flops"])

    reward = results["reward_model"]
    assert reward["label_type"] == "best_of_4"
    for stage in ("forward", "train"):
        assert STAGE_FIELDS | {"examples_per_second", "roofline"} == set(reward[stage])
    assert reward["train"]["flops"] == 3 * 4 * reward["forward"]["flops"]

    batch_rows, length_rows = results["growth"]["batch"], results["growth"]["response_length"]
    assert [(row["batch"], row["response_length"]) for row in batch_rows] == [(B, R), (2 * B, R)]
    assert [(row["batch"], row["response_length"]) for row in length_rows] == [(B, R), (B, 2 * R)]
    for rows in (batch_rows, length_rows):
        assert set(rows[1]) == {"batch", "response_length", "seconds", "ratio", "episodes_per_second", "mfu", "parts",
                            "memory"}
        assert rows[0]["ratio"] is None and rows[0]["seconds"] == update["seconds"]
        assert rows[1]["ratio"] == pytest.approx(rows[1]["seconds"] / rows[0]["seconds"])

    for switch in ("xla", "mixed_precision"):
        entry = results["switches"][switch]
        for stage in ("sampling", "ppo_update"):
            assert set(entry[stage]) == {"off_seconds", "on_seconds", "speedup"}
            assert entry[stage]["speedup"] == pytest.approx(entry[stage]["off_seconds"] / entry[stage]["on_seconds"])
    # mixed precision is the base setting here: its "on" side is the base measurement
    assert results["switches"]["mixed_precision"]["ppo_update"]["on_seconds"] == update["seconds"]
    assert set(results["memory"]) == MEMORY_FIELDS
    if not devices.gpu_count():
        assert results["memory"]["gpu_peak_bytes"] is None

    allreduce = results["allreduce"]
    assert (allreduce["elements"], allreduce["bytes"], allreduce["ranks"]) == (1000, 4000, 2)
    assert list(allreduce["paths"]) == ["horovod", "mpi4py"]
    measured = {path: figures for path, figures in allreduce["paths"].items() if "skipped" not in figures}
    assert "mpi4py" in measured and ("horovod" in measured or importlib.util.find_spec("horovod") is None)
    for figures in measured.values():  # the worker checked the averaged values before timing
        assert figures["seconds"] == statistics.median(figures["runs"]) > 0 and len(figures["runs"]) == 1
        assert figures["bus_bytes_per_second"] == pytest.approx(4000 / figures["seconds"])  # 2 (n-1)/n = 1 on 2 ranks

    table = "\n".join(lines)
    for text in ("sampling (with cache)", "reward model forward", "reward model train (best_of_4)", "PPO update",
                 "ppo_epochs", "cost growth of one PPO update, doubling batch", "doubling response length",
                 "xla", "mixed_precision", "gradient all-reduce, 4 kB (1,000 float32) over 2 ranks",
                 "x the PPO update's time", f"wrote {output}"):
        assert text in table


def test_benchmark_growth_stops_at_the_context_window_and_bad_settings_are_rejected():
    hparams = TrainedModel("test").hparams()  # n_ctx 8
    with pytest.raises(ValueError, match="unknown --size 'huge'; known sizes: test, demo, small, 124M"):
        bench.run("huge", output=None, log=lambda line: None)
    with pytest.raises(ValueError, match=r"--query_length 4 \+ --response_length 5 exceed the test model's n_ctx 8"):
        bench.run("test", query_length=4, response_length=5, output=None, log=lambda line: None)
    with pytest.raises(ValueError, match="--repeats must be an integer >= 1, got 0"):
        bench.run("test", repeats=0, output=None, log=lambda line: None)
    with pytest.raises(ValueError, match="--peak_flops must be a positive number"):
        bench.run("test", peak_flops=-1, output=None, log=lambda line: None)
    with pytest.raises(ValueError, match="--allreduce_elements must be an integer >= 1, got 0"):
        bench.run("test", allreduce_elements=0, output=None, log=lambda line: None)
    with pytest.raises(ValueError, match="--allreduce_ranks must be an integer >= 0, got -1"):
        bench.run("test", allreduce_ranks=-1, output=None, log=lambda line: None)
    assert hparams.n_ctx == 8


def allocating_run(fresh_pages, kept):
    """A run whose call i writes to fresh_pages[i] fresh 4 KB pages, then touches only memory it already has. The
    pages are an anonymous map without huge pages (numpy asks for 2 MB pages for large arrays, one fault each);
    `kept` holds the maps, so their pages stay mapped."""
    calls = []
    small = np.zeros(1024)

    def run():
        count = fresh_pages[len(calls)]
        calls.append(count)
        if count:
            pages = mmap.mmap(-1, count * mmap.PAGESIZE)
            pages.madvise(mmap.MADV_NOHUGEPAGE)
            np.frombuffer(pages, np.uint8)[::mmap.PAGESIZE] = 1  # one write per page
            kept.append(pages)
        small[:] += 1
        return len(calls)
    return run, calls


SETTLED = 512  # the test's bound on a settled run's page faults (2 MB), set in place of bench's 16,384 (64 MB)


@pytest.mark.parametrize("warmup, fresh_pages, warmup_runs", [
    (1, [0] * 7, 1),  # settled from the start: exactly --warmup untimed runs
    (1, [4 * SETTLED] + [0] * 6, 2),  # the first run grows the pool, the second shows it settled
    (1, [12 * SETTLED, 4 * SETTLED] + [0] * 5, 3),  # still growing in the second run (a 124M reward-model step)
    (1, [4 * SETTLED] * 7, 2),  # as many faults each run: memory mapped afresh every time, not a growing pool
    (1, [128 * SETTLED, 32 * SETTLED, 8 * SETTLED, 3 * SETTLED] + [0] * 3, 1 + bench.WARMUP_MAX_EXTRA),  # capped
    (2, [4 * SETTLED] + [0] * 6, 2),  # settled within --warmup
    (0, [4 * SETTLED] * 7, 0),  # --warmup 0: no untimed run, nothing to judge the allocator by
])
def test_the_warmup_goes_on_while_the_memory_pool_still_grows(warmup, fresh_pages, warmup_runs, monkeypatch):
    monkeypatch.setattr(bench, "SETTLED_PAGE_FAULTS", SETTLED)
    kept = []
    run, calls = allocating_run(fresh_pages, kept)
    runs = bench.timed_runs(run, bench.Settings(warmup=warmup, repeats=2, noptepochs=1, xla=False,
                                                mixed_precision=False))
    assert len(calls) == warmup_runs + 2 and len(runs.warmup_page_faults) == warmup_runs
    assert [result for _, result in runs] == [warmup_runs + 1, warmup_runs + 2]  # the timed runs come after
    for faults, pages in zip(runs.warmup_page_faults, fresh_pages):  # each run's own faults were counted
        assert pages <= faults < pages + SETTLED // 2, runs.warmup_page_faults
    for pages in kept:
        pages.close()


def test_a_bad_flag_of_the_command_is_one_line_and_nothing_is_written(tmp_path):
    output = tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("LMHP_TRACEBACK", None)
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench.py"), "--size", "test", "--warmup", "-1",
                             "--output", str(output)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr == ("error: bench.py: --warmup must be an integer >= 0, got -1\n"
                             "(set LMHP_TRACEBACK=1 to see where it was raised)\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("ranks, reason", [(0, "--allreduce_ranks 0"), (1, "one rank all-reduces nothing")])
def test_an_allreduce_on_fewer_than_two_ranks_is_skipped_with_the_reason(ranks, reason):
    settings = bench.Settings(warmup=0, repeats=1, noptepochs=1, xla=False, mixed_precision=False)
    result = bench.measure_allreduce(1000, ranks, settings)
    assert result["paths"] == {} and result["skipped"].startswith(reason)


def test_overall_gpu_memory_is_the_largest_stage_peak():
    results = {"sampling": {"memory": {"gpu_peak_bytes": 5}}, "growth": {"batch": [{"memory": {"gpu_peak_bytes": 9}},
                                                                               {"skipped": "n_ctx"}]},
               "reward_model": {"train": {"memory": {"gpu_peak_bytes": None}}}}
    memory = bench.overall_memory(results)
    assert memory["gpu_peak_bytes"] == 9 and memory["host_peak_rss_bytes"] > 0
    assert bench.overall_memory({"sampling": {"memory": {"gpu_peak_bytes": None}}})["gpu_peak_bytes"] is None


def test_device_info_takes_the_given_peak():
    device = bench.device_info(1e12, "float32")
    assert device["peak_flops"] == 1e12 and device["peak_flops_source"] == "given by --peak_flops"


# ----- bf16 mixed precision in the model ------------------------------------------------------------------------

def randomize(sess, variables, seed=0):
    """Weights large enough that every block matters (initial values are tiny)."""
    rng = np.random.RandomState(seed)
    for var in variables:
        value = rng.normal(size=var.shape.as_list()) * 0.3 + (1.0 if var.op.name.endswith("/g") else 0.0)
        var.load(value.astype(np.float32), sess)


def test_bfloat16_model_is_close_to_float32_with_the_same_float32_variables():
    hparams = lm_model.HParams(n_vocab=27, n_ctx=16, n_embd=16, n_head=2, n_layer=2)
    tokens = np.random.RandomState(1).randint(0, 28, size=(3, 10)).astype(np.int32)
    with tf.variable_scope("policy"):
        full = lm_model.Model(hparams, scalar_heads=["value"], scope="model")
    expected = full(tokens, padding_token=27)
    count = len(tf.global_variables())
    with tf.variable_scope("policy"):
        mixed = lm_model.Model(hparams, scalar_heads=["value"], scope="model", compute_dtype=tf.bfloat16)
    got = mixed(tokens, padding_token=27)
    assert len(tf.global_variables()) == count  # the same float32 variables: checkpoints are unchanged
    assert all(v.dtype.base_dtype == tf.float32 for v in tf.global_variables())
    bf16_matmuls = [op for op in tf.get_default_graph().get_operations()
                    if op.type in ("MatMul", "BatchMatMulV2") and op.get_attr("T") == tf.bfloat16]
    assert len(bf16_matmuls) >= 2 * 6 + 1  # every layer's matmuls and the output layer
    for name in ("lm_logits", "hidden", "value"):
        assert got[name].dtype == tf.float32, name  # log-probs and heads are computed in float32
    assert got["present"].dtype == tf.bfloat16
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess, tf.global_variables())
        expected, got = sess.run([expected, got])
    for name in ("lm_logits", "hidden", "value"):
        scale = np.abs(expected[name]).max()
        error = np.abs(got[name] - expected[name]).max()
        assert 0 < error < 0.05 * scale, (name, error, scale)  # bf16 keeps ~3 significant digits
    np.testing.assert_allclose(got["present"].astype(np.float32), expected["present"], atol=0.05, rtol=0.05)


def test_bfloat16_policy_and_reward_model_are_close_to_float32_and_train():
    trained_model = TrainedModel("test")
    queries = np.array([[1, 2, 3], [4, 5, PAD]], np.int32)
    responses = np.array([[6, 7, 8, 9], [10, 11, 12, 13]], np.int32)
    full = Policy(trained_model, scope="policy")
    mixed = Policy(trained_model, scope="mixed_policy", compute_dtype=tf.bfloat16)
    full_reward = RewardModel(trained_model, scope="reward_model")
    mixed_reward = RewardModel(trained_model, scope="mixed_reward_model", compute_dtype=tf.bfloat16)
    rewards = [model.get_rewards_op(queries, responses) for model in (full_reward, mixed_reward)]
    mixed_outputs = mixed.analyze_responses_op(queries, responses)
    gradients = tf.gradients(tf.reduce_sum(mixed_outputs["logprobs"]) + tf.reduce_sum(mixed_outputs["values"]),
                             mixed.get_params())
    assert all(g is not None for g in gradients)
    gradients = [tf.convert_to_tensor(g) for g in gradients]  # the embeddings' are IndexedSlices
    with tf.Session() as sess, sess.as_default():
        sess.run(tf.global_variables_initializer())
        for policy in (full, mixed):  # the same weights in both
            randomize(sess, policy.get_params())
        for model in (full_reward, mixed_reward):
            randomize(sess, model.get_params(), seed=1)
        expected = full.analyze_responses(queries, responses)
        got = mixed.analyze_responses(queries, responses)
        for name in ("logprobs", "entropies", "values"):
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], expected[name], atol=0.1 * np.abs(expected[name]).max(),
                                       err_msg=name)
        full_rewards, mixed_rewards = sess.run(rewards)
        np.testing.assert_allclose(mixed_rewards, full_rewards, atol=0.05 * np.abs(full_rewards).max())
        # sampling with the bf16 cache gives log-probs that a bf16 forward pass reproduces (PPO's ratio ~ 1)
        sampled = mixed.respond(queries, 4)
        again = mixed.analyze_responses(queries, sampled["responses"])
        np.testing.assert_allclose(sampled["logprobs"], again["logprobs"], atol=0.1)
        # gradients reach the float32 variables, finite
        values = sess.run(gradients)
        assert all(value.dtype == np.float32 and np.all(np.isfinite(value)) for value in values)
        assert max(np.abs(value).max() for value in values) > 0


@pytest.mark.parametrize("dtype", [tf.float16, "int32", None])
def test_unsupported_compute_dtypes_are_rejected(dtype):
    with pytest.raises(ValueError, match="compute_dtype must be one of float32, bfloat16"):
        lm_model.Model(HP, compute_dtype=dtype)


# ----- bytes, the roofline and the machine's measured limits -----------------------------------------------------

def test_forward_bytes_match_a_hand_computation():
    # batch 3, 5 tokens, logits at all 5 positions; n_embd 4, 2 layers, 2 heads, n_vocab 10; float32 (4 bytes).
    weights = 2 * 12 * 4 * 4 + 10 * 4  # four matmuls per layer (12·e²) + the tied output layer = 424 values
    activations = 3 * 5 * 2 * (4 + 12 + 4 + 4 + 4 + 16 + 16 + 4)  # per token and layer: in/out of the 4 matmuls
    cache = 3 * 2 * 2 * 4 * 5  # keys and values (2·e) of 5 positions, 2 layers = 240 values
    scores = 2 * 3 * 2 * 2 * 5 * 5  # [b, layers, heads, t, keys] written and read = 600 float32
    logits = 2 * 3 * 5 * 10  # written and read = 300 float32
    expected = 4 * (weights + activations + cache + scores + logits)
    assert expected == 4 * (424 + 1920 + 240 + 600 + 300) == 13936
    assert flops.forward_bytes(HP, batch=3, tokens=5, logits=5) == expected
    # without logits nothing of the output layer moves; in bfloat16 the weights and activations are 2 bytes
    assert flops.forward_bytes(HP, batch=3, tokens=5) == 4 * (2 * 12 * 4 * 4 + 1920 + 240 + 600)
    assert flops.forward_bytes(HP, batch=3, tokens=5, logits=5, dtype_bytes=2) == \
        2 * (424 + 1920 + 240) + 4 * (600 + 300)


def test_sampling_reads_every_weight_once_per_token_step():
    one_more = (flops.sampling_bytes(HP, batch=2, context_length=3, response_length=4) -
                flops.sampling_bytes(HP, batch=2, context_length=3, response_length=3))
    assert one_more == flops.forward_bytes(HP, batch=2, tokens=1, keys=3 + 3, logits=1)
    # 124M at batch 8, 100 keys: a step reads the weights (494 MB) and the key/value cache (59 MB)
    step = flops.forward_bytes(lm_model.HParams(), batch=8, tokens=1, keys=100, logits=1)
    weights = 4 * (12 * 12 * 768 * 768 + 50257 * 768)
    cache = 4 * 8 * 12 * 2 * 768 * 100
    small = 4 * (8 * 12 * 16 * 768 + 2 * 8 * 12 * 12 * 100 + 2 * 8 * 50257)  # activations, scores, logits
    assert (weights, cache) == (494_128_128, 58_982_400) and step == weights + cache + small


def test_parameter_count_is_the_models_variables():
    for hparams in (HP, lm_model.HParams(n_vocab=27, n_ctx=8, n_embd=6, n_head=3, n_layer=3)):
        with tf.Graph().as_default():
            model = lm_model.Model(hparams, scalar_heads=["value"])
            model(tf.zeros([1, 2], tf.int32))
            counted = sum(int(np.prod(v.shape.as_list())) for v in model.get_params())
        assert flops.parameter_count(hparams, scalar_heads=1) == counted
    assert flops.parameter_count(lm_model.HParams()) == bench.GPT2_124M_PARAMETERS


def test_training_bytes_are_three_passes_and_an_adam_step_over_every_parameter():
    shape = dict(query_length=3, response_length=2)
    assert flops.reward_training_bytes(HP, batch=2, num_samples=4, **shape) == \
        3 * 4 * flops.reward_bytes(HP, batch=2, **shape) + 7 * 4 * flops.parameter_count(HP, scalar_heads=1)
    parts = flops.ppo_update_bytes(HP, HP, batch=2, context_length=4, query_length=3, response_length=3,
                                   noptepochs=4, nminibatches=2)
    analyze = flops.analyze_responses_bytes(HP, batch=2, context_length=4, response_length=3)
    assert parts["ppo_epochs"] == 4 * (3 * analyze + 2 * 7 * 4 * flops.parameter_count(HP, scalar_heads=1))
    assert parts["rollout"] == flops.sampling_bytes(HP, batch=2, context_length=4, response_length=3)
    assert parts["ref_logprobs"] == analyze and parts["stats"] == 0


def test_roofline_names_the_bound_whose_time_at_the_measured_limit_is_longer():
    # 100 FLOPs and 10 bytes in 2 s on a machine of 1000 FLOP/s and 10 B/s: 0.1 s of matmul, 1 s of traffic
    memory_bound = flops.roofline(flop_count=100, byte_count=10, seconds=2.0, matmul_flops_per_second=1000.0,
                                  bytes_per_second=10.0)
    assert memory_bound == {"bytes": 10, "bytes_per_second": 5.0, "arithmetic_intensity": 10.0,
                            "compute_utilisation": pytest.approx(0.05), "memory_utilisation": pytest.approx(0.5),
                            "bound": "memory", "roofline_seconds": pytest.approx(1.0),
                            "bound_utilisation": pytest.approx(0.5)}
    compute_bound = flops.roofline(flop_count=4000, byte_count=10, seconds=8.0, matmul_flops_per_second=1000.0,
                                   bytes_per_second=10.0)
    assert (compute_bound["bound"], compute_bound["bound_utilisation"]) == ("compute", pytest.approx(0.5))
    unknown = flops.roofline(flop_count=1, byte_count=1, seconds=1.0, matmul_flops_per_second=None,
                             bytes_per_second=None)
    assert unknown["bound"] is None and unknown["compute_utilisation"] is None and unknown["bytes"] == 1


def check_calibration(calibration, hparams, tokens):
    shapes = [[tokens, 7, 21], [tokens, 7, 7], [tokens, 7, 28], [tokens, 28, 7], [tokens, 7, 27]]
    measured = [entry for entry in calibration["matmuls"] if entry["shape"][0] == tokens]
    assert [entry["shape"] for entry in measured] == shapes == bench.matmul_shapes(hparams, tokens)
    for entry in calibration["matmuls"]:
        m, k, n = entry["shape"]
        assert entry["dtype"] == "float32" and entry["seconds"] == min(entry["repeats_seconds"]) > 0
        assert len(entry["repeats_seconds"]) == bench.CALIBRATION_REPEATS  # at least that many, the fastest counts
        assert entry["flops_per_second"] == pytest.approx(2 * m * k * n / entry["seconds"])
    assert calibration["matmul_flops_per_second"] == {"float32": max(entry["flops_per_second"] for entry in measured)}
    memory = calibration["memory"]
    assert memory["array_bytes"] == bench.BANDWIDTH_ARRAY_BYTES
    read = memory["array_bytes"] / min(memory["read_repeats_seconds"])
    copy = 2 * memory["array_bytes"] / min(memory["copy_repeats_seconds"])
    assert memory["read_bytes_per_second"] == pytest.approx(read)
    assert memory["copy_bytes_per_second"] == pytest.approx(copy)
    assert calibration["bytes_per_second"] == memory["bytes_per_second"] == max(read, copy)
    assert 1e8 < memory["bytes_per_second"] < 1e13  # a real memory system: 0.1 GB/s to 10 TB/s


def test_calibration_is_measured_cached_and_every_stage_has_its_roofline(tmp_path):
    output = tmp_path / "bench.json"
    hparams = TrainedModel("test").hparams()
    lines = []
    returned = bench.run("test", warmup=0, repeats=2, calibrate=True, output=str(output), log=lines.append)
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(returned)) and set(saved) == {"config", "device", "calibration"}
    calibration = saved["calibration"]
    check_calibration(calibration, hparams, tokens=8 * (2 + 2))  # batch x (query + response)
    assert calibration["key"] == {"kind": "cpu" if not devices.gpu_count() else "gpu",
                                  "name": saved["device"]["name"], "count": saved["device"]["count"],
                                  "tensorflow": tf.__version__}
    assert calibration["reused"] is None
    table = "\n".join(lines)
    assert "calibration: float32 matmul [32, 7] x [7, 21] ..." in table and "ridge point" in table

    # a benchmark run takes the limits cached in its output file and measures none
    lines = []
    results = bench.run("test", warmup=0, repeats=1, noptepochs=1, growth_steps=0, switches=False,
                        allreduce_ranks=0, output=str(output), log=lines.append)
    assert not any("calibration:" in line for line in lines)
    assert results["calibration"]["matmuls"] == calibration["matmuls"]
    assert results["calibration"]["memory"] == calibration["memory"]
    assert results["calibration"]["reused"] == "5 matmul sizes and the bandwidth cached in the output file"
    matmul, bandwidth = calibration["matmul_flops_per_second"]["float32"], calibration["bytes_per_second"]
    B, Q, R = 8, 2, 2
    expected_bytes = {
        "sampling (rollout)": flops.sampling_bytes(hparams, batch=B, context_length=Q, response_length=R),
        "reward model forward": flops.reward_bytes(hparams, batch=B, query_length=Q, response_length=R),
        "reward model train": flops.reward_training_bytes(hparams, batch=B, num_samples=4, query_length=Q,
                                                          response_length=R)}
    parts = flops.ppo_update_bytes(hparams, hparams, batch=B, context_length=Q, query_length=Q, response_length=R,
                                   noptepochs=1)
    expected_bytes.update({f"PPO {part}": parts[part] for part in ("ref_logprobs", "score", "ppo_epochs")},
                          **{"PPO update (whole)": sum(parts.values())})
    context = flops.sampling_bytes(hparams, batch=B, context_length=Q, response_length=1)
    expected_bytes.update({"  context pass": context,
                           "  token steps": expected_bytes["sampling (rollout)"] - context})
    rows = dict(bench.roofline_rows(results))
    assert set(rows) == set(expected_bytes)
    for name, figures in rows.items():
        roof = figures["roofline"]
        assert roof["bytes"] == expected_bytes[name], name
        compute = figures["flops"] / figures["seconds"] / matmul
        memory = roof["bytes"] / figures["seconds"] / bandwidth
        assert roof["compute_utilisation"] == pytest.approx(compute)
        assert roof["memory_utilisation"] == pytest.approx(memory)
        assert roof["arithmetic_intensity"] == pytest.approx(figures["flops"] / roof["bytes"])
        assert roof["bound"] == ("compute" if roof["arithmetic_intensity"] >= matmul / bandwidth else "memory")
        assert roof["bound_utilisation"] == pytest.approx(max(compute, memory))
        assert roof["roofline_seconds"] == pytest.approx(max(figures["flops"] / matmul, roof["bytes"] / bandwidth))
    sampling = results["sampling"]
    steps = sampling["token_steps"]
    assert steps["steps"] == R - 1 and sampling["seconds_per_token_step"] == pytest.approx(steps["seconds"] / (R - 1))
    assert steps["seconds"] == pytest.approx(max(sampling["seconds"] - sampling["context_pass"]["seconds"], 1e-9))
    assert steps["flops"] + sampling["context_pass"]["flops"] == sampling["flops"]
    table = "\n".join(lines)
    assert "roofline against the measured limits" in table and "ms per token step" in table
    assert "PPO ppo_epochs" in table and "5 matmul sizes and the bandwidth cached" in table


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), ("True", True)])
def test_switches_read_true_and_false_as_fire_gives_them(value, expected):
    assert bench.flag("switches", value) is expected


def test_a_switch_given_something_else_is_refused():
    with pytest.raises(ValueError, match=r"--switches is a switch \(--switches, --noswitches, --switches true\|false\), "
                                         r"got 'off'"):
        bench.run("test", switches="off", output=None, log=lambda line: None)


def test_a_calibration_measures_only_what_its_cache_lacks():
    hparams = TrainedModel("test").hparams()
    settings = bench.Settings(warmup=0, repeats=1, noptepochs=1, xla=False, mixed_precision=False)
    device = bench.device_info(None, "float32")
    lines = []
    first = bench.calibrate_machine(device, hparams, bench.Shape(2, 2, 2), settings, None, lines.append)
    assert len([line for line in lines if "calibration:" in line]) == 6  # 5 matmul sizes and the bandwidth
    lines = []
    # another batch: its 5 matmul sizes are measured, the bandwidth is reused
    second = bench.calibrate_machine(device, hparams, bench.Shape(4, 2, 2), settings, first, lines.append)
    assert [line for line in lines if "calibration:" in line] == [
        f"  calibration: float32 matmul [16, {k}] x [{k}, {n}] ..." for _, k, n in bench.matmul_shapes(hparams, 16)]
    assert second["memory"] == first["memory"] and second["matmuls"][:5] == first["matmuls"]
    check_calibration(second, hparams, tokens=16)
    assert second["reused"] == "0 matmul sizes and the bandwidth cached in the output file"
    # measured on another device or TensorFlow: nothing is reused
    lines = []
    foreign = dict(second, key=dict(second["key"], name="another CPU"))
    third = bench.calibrate_machine(device, hparams, bench.Shape(4, 2, 2), settings, foreign, lines.append)
    assert len([line for line in lines if "calibration:" in line]) == 6 and third["reused"] is None
    assert bench.read_cached_calibration(None) is None


def test_a_cache_given_as_per_layer_pairs_computes_what_the_stacked_cache_does():
    # What sampling feeds back each step (`cache`) against the stacked `present` form, with padding in the cache.
    hparams = lm_model.HParams(n_vocab=10, n_ctx=16, n_embd=8, n_head=2, n_layer=3)
    context = np.array([[1, 2, 3], [4, 10, 10]], np.int32)  # 10: padding
    step = np.array([[5], [6]], np.int32)
    model = lm_model.Model(hparams, scalar_heads=["value"])
    first = model(context, padding_token=10)
    stacked = model(step, past=first["present"], past_tokens=context, padding_token=10)
    pairs = model(step, past=first["cache"], past_tokens=context, padding_token=10)
    whole = model(np.concatenate([context, step], axis=1), padding_token=10)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        randomize(sess, tf.global_variables())
        stacked, pairs, whole, first_present = sess.run([stacked, pairs, whole, first["present"]])
    for name in ("lm_logits", "value", "present"):
        np.testing.assert_allclose(pairs[name], stacked[name], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(pairs["lm_logits"][:, -1], whole["lm_logits"][:, -1], rtol=1e-4, atol=1e-5)
    for layer, (keys, values) in enumerate(pairs["cache"]):  # every position: the first call's, then the step's
        np.testing.assert_array_equal(keys, np.concatenate([first_present[:, layer, 0], stacked["present"][:, layer, 0]],
                                                           axis=-2))
        np.testing.assert_array_equal(values, np.concatenate([first_present[:, layer, 1],
                                                              stacked["present"][:, layer, 1]], axis=-2))
    with pytest.raises(ValueError, match=r"one \(keys, values\) pair per layer \(3\), got 2"):
        model(step, past=pairs["cache"][:2], past_tokens=context, padding_token=10)
