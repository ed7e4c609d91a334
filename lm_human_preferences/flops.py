"""FLOPs and bytes the model math needs, counted from shapes, the peak FLOP/s of a device, and the roofline
of a stage against measured limits (for bench.py).

Counting convention (the usual one for model-FLOPs utilisation):

* matmuls only, one multiply-add = 2 FLOPs; elementwise work (layer norm, GELU, softmax, residual adds) is
  O(n_embd) per token against the matmuls' O(n_embd²) and is not counted;
* per transformer layer and token: QKV 2·e·3e, attention output projection 2·e·e, MLP 2·e·4e + 2·4e·e,
  together 24·e² (twice the layer's 12·e² weights); attention scores q·kᵀ and the weighted sum of values
  2·e·keys each, where `keys` is every position the token's row of the score matrix spans (the dense
  [tokens, keys] matrix is computed; the causal mask saves no work);
* the tied output layer 2·e·n_vocab per position whose logits are computed, a scalar head 2·e per position;
* backward = 2 × forward (gradients with respect to activations and to weights), so a training step costs
  3 × its forward pass.

The counts follow what the graphs compute (see policy.py, rewards.py, language/sample.py): sampling with the
cache feeds the context once and then one token per step; the reward model never computes logits (TensorFlow
runs only the ops a fetch needs); `analyze_responses` feeds context + response[:-1] and computes logits for
the last `response_length` positions.

Bytes (the memory side of the roofline) are a lower bound on the traffic to and from main memory that the
same math needs however well it is scheduled, at `dtype_bytes` per value (4 for float32):

* per model call, every matmul weight is read once (12·e² per layer; the tied output layer's n_vocab·e when
  logits are computed): in sampling, one call per token step, so the weights are read once per step;
* activations that the matmuls read and write: per layer and token 16·e values (QKV in e, out 3e; projection
  in e, out e; MLP in e, out 4e; in 4e, out e); the cached keys and values read once per call
  (2·e per key position and layer) and the new ones written; the attention score matrix written once and read
  once (heads·tokens·keys, float32); the logits written once and read once (float32);
* a training step moves 3 × its forward bytes (the backward pass reads the weights and activations again and
  writes the gradients), plus Adam's update of every parameter: read the parameter, its gradient and both
  moments, write the parameter and both moments (7 values per parameter, float32).

Elementwise work (layer norms, GELU, residual adds) is counted neither as FLOPs nor as bytes: a fused kernel
needs no traffic of its own for it. The counts are what a stage must move at least; what the graph moves is
more (see bench.py's roofline, which compares the two only through time).
"""

import re
from typing import TYPE_CHECKING, Dict, Optional, Tuple

if TYPE_CHECKING:  # counting needs only the shape; importing the model would import TensorFlow
    from lm_human_preferences.language.model import HParams

# A training step = forward + backward (2 × forward).
TRAIN_STEP_MULTIPLIER = 3


# ----- the transformer ------------------------------------------------------------------------------------------

def layer_matmul_flops_per_token(n_embd: int) -> int:
    """QKV (3e²) + attention projection (e²) + MLP (8e²) multiply-adds, 2 FLOPs each."""
    return 2 * 12 * n_embd * n_embd


def attention_flops_per_token(n_embd: int, keys: int) -> int:
    """Scores q·kᵀ and the weighted sum of values over `keys` positions, all heads together."""
    return 2 * 2 * n_embd * keys


def forward_flops(hparams: "HParams", *, batch: int, tokens: int, keys: Optional[int] = None, logits: int = 0,
                  scalar_heads: int = 0) -> int:
    """One Model call on `batch` sequences of `tokens` new positions.

    keys: positions each new token's score row spans (cache + chunk); default `tokens` (no cache).
    logits: positions whose output logits are computed (`logits_for_last`, or all).
    scalar_heads: heads read at every position (the value head of the policy, the reward head).
    """
    keys = tokens if keys is None else keys
    e = hparams.n_embd
    per_layer = tokens * (layer_matmul_flops_per_token(e) + attention_flops_per_token(e, keys))
    output_layer = logits * 2 * e * hparams.n_vocab
    heads = scalar_heads * tokens * 2 * e
    return batch * (hparams.n_layer * per_layer + output_layer + heads)


def sampling_flops(hparams: "HParams", *, batch: int, context_length: int, response_length: int) -> int:
    """Policy.respond_op: the context in one call, then one cached step per further response token; every
    call computes the logits of its last position and the value head at each position."""
    first = forward_flops(hparams, batch=batch, tokens=context_length, logits=1, scalar_heads=1)
    steps = sum(forward_flops(hparams, batch=batch, tokens=1, keys=context_length + step, logits=1, scalar_heads=1)
                for step in range(1, response_length))
    return first + steps


def analyze_responses_flops(hparams: "HParams", *, batch: int, context_length: int, response_length: int) -> int:
    """Policy.analyze_responses_op: context + response[:-1] in one call, logits for the last R positions."""
    tokens = context_length + response_length - 1
    return forward_flops(hparams, batch=batch, tokens=tokens, logits=response_length, scalar_heads=1)


def reward_flops(hparams: "HParams", *, batch: int, query_length: int, response_length: int) -> int:
    """RewardModel.get_rewards_op: query + response in one call, the reward head only (no logits)."""
    return forward_flops(hparams, batch=batch, tokens=query_length + response_length, scalar_heads=1)


def reward_training_flops(hparams: "HParams", *, batch: int, num_samples: int, query_length: int,
                          response_length: int) -> int:
    """One reward-model training step on `batch` best_of_N labels: N rewards per label, forward + backward."""
    return TRAIN_STEP_MULTIPLIER * num_samples * reward_flops(hparams, batch=batch, query_length=query_length,
                                                              response_length=response_length)


def ppo_update_flops(policy: "HParams", reward: "HParams", *, batch: int, context_length: int, query_length: int,
                     response_length: int, noptepochs: int) -> Dict[str, int]:
    """One PPO update (train_policy.PPOTrainer.update) by part: rollout, reference log-probs, scoring, and
    `noptepochs` passes of forward + backward over every episode. The reward model reads the bare query."""
    shape = dict(batch=batch, context_length=context_length, response_length=response_length)
    return {
        "rollout": sampling_flops(policy, **shape),
        "ref_logprobs": analyze_responses_flops(policy, **shape),
        "score": reward_flops(reward, batch=batch, query_length=query_length, response_length=response_length),
        "ppo_epochs": noptepochs * TRAIN_STEP_MULTIPLIER * analyze_responses_flops(policy, **shape),
        "stats": 0,
    }


# ----- bytes ----------------------------------------------------------------------------------------------------

FLOAT32_BYTES = 4
# Values Adam reads and writes per parameter and step: read the parameter, its gradient, m and v; write the
# parameter, m and v.
ADAM_VALUES_PER_PARAMETER = 7
# Activation values per layer and token that the four matmuls of a block read and write (see the docstring).
MATMUL_ACTIVATIONS_PER_TOKEN = 16


def parameter_count(hparams: "HParams", scalar_heads: int = 0) -> int:
    """Every trainable value: embeddings (n_vocab·e + n_ctx·e), per layer the four matmuls' 12·e² weights and
    biases (9·e) and two layer norms (4·e), the final layer norm (2·e) and e + 1 per scalar head."""
    e = hparams.n_embd
    per_layer = 12 * e * e + 9 * e + 4 * e
    return (hparams.n_vocab * e + hparams.n_ctx * e + hparams.n_layer * per_layer + 2 * e
            + scalar_heads * (e + 1))


def forward_bytes(hparams: "HParams", *, batch: int, tokens: int, keys: Optional[int] = None, logits: int = 0,
                  dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Bytes one Model call must move at least (see the module docstring); arguments as `forward_flops`."""
    keys = tokens if keys is None else keys
    e, layers = hparams.n_embd, hparams.n_layer
    weights = layers * 12 * e * e + (hparams.n_vocab * e if logits else 0)
    activations = batch * tokens * layers * MATMUL_ACTIVATIONS_PER_TOKEN * e
    cache = batch * layers * 2 * e * keys  # keys and values read (the new ones written are part of `keys`)
    values = dtype_bytes * (weights + activations + cache)
    scores = FLOAT32_BYTES * 2 * batch * layers * hparams.n_head * tokens * keys  # written once, read once
    output = FLOAT32_BYTES * 2 * batch * logits * hparams.n_vocab  # written once, read once
    return values + scores + output


def sampling_bytes(hparams: "HParams", *, batch: int, context_length: int, response_length: int,
                   dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Policy.respond_op, call by call as `sampling_flops`: the weights are read once per token step."""
    first = forward_bytes(hparams, batch=batch, tokens=context_length, logits=1, dtype_bytes=dtype_bytes)
    return first + sum(forward_bytes(hparams, batch=batch, tokens=1, keys=context_length + step, logits=1,
                                     dtype_bytes=dtype_bytes) for step in range(1, response_length))


def analyze_responses_bytes(hparams: "HParams", *, batch: int, context_length: int, response_length: int,
                            dtype_bytes: int = FLOAT32_BYTES) -> int:
    return forward_bytes(hparams, batch=batch, tokens=context_length + response_length - 1,
                         logits=response_length, dtype_bytes=dtype_bytes)


def reward_bytes(hparams: "HParams", *, batch: int, query_length: int, response_length: int,
                 dtype_bytes: int = FLOAT32_BYTES) -> int:
    return forward_bytes(hparams, batch=batch, tokens=query_length + response_length, dtype_bytes=dtype_bytes)


def adam_bytes(parameters: int) -> int:
    """One Adam step over `parameters` float32 values."""
    return FLOAT32_BYTES * ADAM_VALUES_PER_PARAMETER * parameters


def reward_training_bytes(hparams: "HParams", *, batch: int, num_samples: int, query_length: int,
                          response_length: int, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """One reward-model training step: N reward passes forward + backward, then Adam over every parameter."""
    passes = TRAIN_STEP_MULTIPLIER * num_samples * reward_bytes(
        hparams, batch=batch, query_length=query_length, response_length=response_length, dtype_bytes=dtype_bytes)
    return passes + adam_bytes(parameter_count(hparams, scalar_heads=1))


def ppo_update_bytes(policy: "HParams", reward: "HParams", *, batch: int, context_length: int, query_length: int,
                     response_length: int, noptepochs: int, nminibatches: int = 1,
                     dtype_bytes: int = FLOAT32_BYTES) -> Dict[str, int]:
    """One PPO update by part, as `ppo_update_flops`; each epoch takes `nminibatches` Adam steps."""
    shape = dict(batch=batch, context_length=context_length, response_length=response_length,
                 dtype_bytes=dtype_bytes)
    analyze = analyze_responses_bytes(policy, **shape)
    return {
        "rollout": sampling_bytes(policy, **shape),
        "ref_logprobs": analyze,
        "score": reward_bytes(reward, batch=batch, query_length=query_length, response_length=response_length,
                              dtype_bytes=dtype_bytes),
        "ppo_epochs": noptepochs * (TRAIN_STEP_MULTIPLIER * analyze
                                    + nminibatches * adam_bytes(parameter_count(policy, scalar_heads=1))),
        "stats": 0,
    }


# ----- the roofline ---------------------------------------------------------------------------------------------

def roofline(*, flop_count: int, byte_count: int, seconds: float, matmul_flops_per_second: Optional[float],
             bytes_per_second: Optional[float]) -> dict:
    """Where a stage that did `flop_count` FLOPs and had to move `byte_count` bytes in `seconds` stands against
    this machine's measured matmul FLOP/s and memory bandwidth.

    compute_utilisation = FLOP/s / matmul FLOP/s; memory_utilisation = bytes/s / bandwidth; the bound is the
    one whose time at the measured limit is the longer ("compute" when the arithmetic intensity FLOP/byte is
    at least the machine's ridge point matmul FLOP/s / bandwidth, else "memory"); roofline_seconds is that
    time, and bound_utilisation = roofline_seconds / seconds, the utilisation of the limit that applies (1 =
    the stage runs at this machine's measured limit)."""
    result = {"bytes": int(byte_count), "bytes_per_second": byte_count / seconds,
              "arithmetic_intensity": flop_count / byte_count if byte_count else None,
              "compute_utilisation": None, "memory_utilisation": None, "bound": None, "roofline_seconds": None,
              "bound_utilisation": None}
    if matmul_flops_per_second and bytes_per_second:
        compute_seconds = flop_count / matmul_flops_per_second
        memory_seconds = byte_count / bytes_per_second
        bound_seconds = max(compute_seconds, memory_seconds)
        result.update(compute_utilisation=compute_seconds / seconds, memory_utilisation=memory_seconds / seconds,
                      bound="compute" if compute_seconds >= memory_seconds else "memory",
                      roofline_seconds=bound_seconds, bound_utilisation=bound_seconds / seconds)
    return result


# ----- device peaks ---------------------------------------------------------------------------------------------

# Dense peak FLOP/s of NVIDIA GPUs from their datasheets (no sparsity): float32 on CUDA cores, TF32 and bf16
# on tensor cores (None: the GPU has no such tensor cores). The first pattern that matches the name wins.
GPU_PEAKS = [
    (r"H200", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12}),
    (r"H100.*PCIe", {"float32": 51.2e12, "tf32": 378e12, "bfloat16": 756e12}),
    (r"H100", {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12}),  # SXM
    (r"A100", {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12}),
    (r"\bA10G?\b", {"float32": 31.2e12, "tf32": 62.5e12, "bfloat16": 125e12}),
    (r"\bL4\b", {"float32": 30.3e12, "tf32": 60e12, "bfloat16": 121e12}),
    (r"V100", {"float32": 15.7e12, "tf32": None, "bfloat16": None}),
    (r"\bT4\b", {"float32": 8.1e12, "tf32": None, "bfloat16": None}),
]


def gpu_peak_flops(device_name: str, *, dtype: str, tf32: bool) -> Tuple[Optional[float], str]:
    """(peak FLOP/s or None, how it was chosen) for a GPU named `device_name` computing in `dtype`
    ("float32" or "bfloat16"); `tf32`: TensorFlow runs float32 matmuls as TF32 (its default on Ampere+)."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, device_name):
            if dtype == "bfloat16":
                column = "bfloat16" if peaks["bfloat16"] else "float32"
            else:
                column = "tf32" if tf32 and peaks["tf32"] else "float32"
            return peaks[column], f"datasheet dense {column} peak of {pattern!r} GPUs (matched {device_name!r})"
    return None, f"no known peak for GPU {device_name!r}: pass --peak_flops"


# float32 FLOPs per cycle per core: vector lanes × 2 (multiply-add) × FMA units, by the widest SIMD the CPU has.
CPU_FLOPS_PER_CYCLE = [
    ("avx512f", 64, "AVX-512: 16 float32 lanes × 2 (FMA) × 2 FMA units"),
    ("fma", 32, "AVX2 + FMA: 8 float32 lanes × 2 (FMA) × 2 FMA units"),
    ("avx", 16, "AVX: 8 float32 lanes, separate add and multiply units"),
    ("sse2", 8, "SSE2: 4 float32 lanes, separate add and multiply units"),
]


def cpu_peak_flops(cpuinfo: str, cores: int) -> Tuple[Optional[float], str]:
    """(peak FLOP/s or None, the assumptions) from /proc/cpuinfo's text: cores × clock × FLOPs/cycle.

    The clock is the reported `cpu MHz` (the current one, not the turbo); each logical CPU is taken as a
    full core (with hyperthreads sharing FMA units the true peak is lower and the MFU shown is too low)."""
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    if not mhz or not flags:
        return None, "could not read the clock and SIMD flags from /proc/cpuinfo: pass --peak_flops"
    flag_set = set(flags.group(1).split())
    for flag, per_cycle, why in CPU_FLOPS_PER_CYCLE:
        if flag in flag_set:
            clock = float(mhz.group(1)) * 1e6
            return (cores * clock * per_cycle,
                    f"{cores} cores × {clock / 1e9:.2f} GHz × {per_cycle} float32 FLOPs/cycle ({why}); "
                    f"every logical CPU counted as a core")
    return None, "no SIMD flag known in /proc/cpuinfo: pass --peak_flops"
