"""Hugging Face GPT-2 models in and out: a `transformers` GPT-2 directory read as one of our models, and a
saved policy or reward model written as one.

In. A *Hugging Face model directory* holds `config.json` (a GPT-2 config: model_type gpt2, activation
gelu_new, layer-norm epsilon 1e-5, tied embeddings), `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and GPT-2's tokenizer files `vocab.json` + `merges.txt`. `hf:OWNER/NAME[@REVISION]`
names such a directory on the Hugging Face Hub; it is fetched with `huggingface_hub.snapshot_download` (its
cache, `$HF_HOME`, retries and progress bars; `$HF_HUB_OFFLINE=1` uses the cache only). Every rank calls it:
the Hub cache locks each file, so a file is downloaded once per machine. Weights are read with the
`safetensors` package's numpy API (no torch) and renamed to the 2019 checkpoint names:

    wte.weight, wpe.weight                     -> model/wte, model/wpe
    h.L.ln_1.weight / .bias (also ln_2, ln_f)  -> model/hL/ln_1/g / b
    h.L.attn.c_attn.weight [in, out] / .bias   -> model/hL/attn/c_attn/w [1, in, out] / b   (also attn.c_proj,
                                                  mlp.c_fc, mlp.c_proj: HF's Conv1D is [in, out], GPT-2's [1, in, out])

with or without a `transformer.` prefix; the attention-mask buffers (`h.L.attn.bias`, `h.L.attn.masked_bias`) are
skipped, and an `lm_head.weight` must equal `wte.weight` (the output embedding is tied). The files an export
adds are read too: `value_head.safetensors` -> `model/heads/value/{w,b}`, `reward_head.safetensors` ->
`model/heads/reward/{w,b}` and `reward_head.json` -> `reward_norm/{gain,bias}`, so an exported reward model
serves as `rewards.trained_model` again. The weights are converted once into a TensorFlow checkpoint in the
file cache (`$LMHP_CACHE_DIR/huggingface/`), which the ordinary loading (`TrainedModel.init_op`) then reads.

The encoding: an `encoding` file (written by our export) names it; otherwise `vocab.json` and `merges.txt` must
be GPT-2's own (they give the `main` encoding; other tokenizers are refused), and a directory with neither is
taken as GPT-2's when its vocabulary has GPT-2's 50257 tokens.

Out. `export(save_dir, out_dir, scope)` writes what `GPT2LMHeadModel.from_pretrained(out_dir)` and (for the
`main` encoding) `AutoTokenizer.from_pretrained(out_dir)` load as they are: `config.json`, `model.safetensors`
(HF names, no prefix), `vocab.json`, `merges.txt`, `tokenizer_config.json`; beside them our own files:
`encoding`, the policy's `value_head.safetensors` or the reward model's `reward_head.safetensors` +
`reward_head.json` (see HEADS_DOC), the run's hyperparameters file, and a `README.md` model card.
"""

import datetime
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings

import numpy as np

from lm_human_preferences.language import encodings
from lm_human_preferences.hparams import LAYER_NORM_EPSILON, ModelHParams as HParams
from lm_human_preferences.utils import files

HUB_PREFIX = "hf:"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
ENCODING_FILE = "encoding"  # our saved-run file: a JSON string naming the encoding
VALUE_HEAD = "value_head.safetensors"
REWARD_HEAD = "reward_head.safetensors"
REWARD_HEAD_JSON = "reward_head.json"
# What snapshot_download fetches of a repository: the model, GPT-2's tokenizer files and our extra files.
HUB_FILES = [CONFIG, WEIGHTS, WEIGHTS_INDEX, "model-*.safetensors", *TOKENIZER_FILES, "tokenizer_config.json",
             ENCODING_FILE, VALUE_HEAD, REWARD_HEAD, REWARD_HEAD_JSON]

GPT2_EOS_TOKEN = 50256  # <|endoftext|>: GPT-2's bos and eos
# HF's GPT-2 activations that are GPT-2's tanh approximation of GELU (the same function under two names).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Buffers older transformers versions saved with the weights: the causal mask and its fill value.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)(@(?P<revision>[^\s@]+))?$")
_CONVERSION_VERSION = 1  # bump when the converted checkpoint's layout changes: the cache key includes it

HEADS_DOC = {  # what the model card says of each scope's head files
    "policy": "`value_head.safetensors`: `weight` [n_embd], `bias` []. The value of a position is "
              "`hidden · weight + bias`, where `hidden` is GPT-2's final hidden state at that position (after "
              "`ln_f`: `GPT2Model(...).last_hidden_state`, or the last of `output_hidden_states`).",
    "reward_model": "`reward_head.safetensors`: `weight` [n_embd], `bias` []; `reward_head.json`: `gain`, `bias`. "
                    "The reward of a query + response is `gain * (hidden_last · weight + head_bias) + bias`, with "
                    "`hidden_last` the final hidden state (after `ln_f`) at the last real token of the query "
                    "followed by the response (padding removed: padding tokens are never fed to the network), "
                    "`weight` and `head_bias` from the safetensors file, `gain` and `bias` from the json.",
}


class HubError(ValueError):
    """An `hf:` model could not be fetched; the message is one line naming the repository and the fix."""


# ----- names --------------------------------------------------------------------------------------------------------

def is_hub_name(name) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """`hf:OWNER/NAME[@REVISION]` -> (repo id, revision or None)."""
    match = _HUB_NAME.match(name[len(HUB_PREFIX):])
    if not match:
        raise ValueError(f"{name!r} is not a Hugging Face model name: expected hf:OWNER/NAME or "
                         f"hf:OWNER/NAME@REVISION (a branch, tag or commit), e.g. hf:openai-community/gpt2")
    return match.group("repo"), match.group("revision")


def is_model_dir(path) -> bool:
    """A local directory holding a Hugging Face config.json and not our hparams.json."""
    if path is None or files.is_remote(path):
        return False
    directory = os.path.expanduser(os.fspath(path))
    return os.path.isfile(os.path.join(directory, CONFIG)) and \
        not os.path.isfile(os.path.join(directory, "hparams.json"))


def download(name: str) -> str:
    """The local snapshot directory of `hf:OWNER/NAME[@REVISION]`, fetched into the Hugging Face cache."""
    repo, revision = parse_hub_name(name)
    import huggingface_hub
    from huggingface_hub import errors

    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
    try:
        directory = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES)
    except errors.RepositoryNotFoundError:
        raise HubError(f"{name}: no repository {repo} on the Hugging Face Hub (or it is private or gated: log in "
                       f"with `hf auth login` or set $HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{name}: the repository {repo} has no revision {revision!r} (a branch, tag or "
                       f"commit)") from None
    except errors.LocalEntryNotFoundError:  # HF_HUB_OFFLINE=1 or no network, and not in the cache
        why = "$HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(f"{name}: {repo} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                       f"and {why}; download it first where there is network with `{fetch}` (`huggingface-cli "
                       f"download` in older huggingface_hub), then run with the same $HF_HOME "
                       f"(and HF_HUB_OFFLINE=1 to stay offline)") from None
    except errors.HfHubHTTPError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(f"{name}: the Hugging Face Hub refused {repo}: {first_line}") from None
    if not os.path.isfile(os.path.join(directory, CONFIG)):
        raise HubError(f"{name}: the repository {repo} has no {CONFIG}; expected a transformers GPT-2 model "
                       f"({CONFIG} and {WEIGHTS})")
    return directory


# ----- config -------------------------------------------------------------------------------------------------------

def read_config(directory) -> dict:
    path = os.path.join(os.path.expanduser(os.fspath(directory)), CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a transformers GPT2Config)")
    return config


def hparams_from_config(config: dict, where: str) -> HParams:
    """Our HParams from a transformers GPT2Config dict; anything that is not GPT-2's architecture is refused
    naming the field. Absent fields take transformers' GPT2Config defaults, except the shape, which must be there."""
    def refuse(field, accepted):
        raise ValueError(f"{where}: {field}={config.get(field)!r} is not supported; expected {accepted} "
                         f"(only GPT-2's architecture can be loaded)")

    if config.get("model_type") != "gpt2":
        refuse("model_type", '"gpt2"')
    if config.get("activation_function", "gelu_new") not in TANH_GELU:
        refuse("activation_function", '"gelu_new" (GPT-2\'s tanh GELU; "gelu_pytorch_tanh" is the same function)')
    if config.get("tie_word_embeddings", True) is not True:
        refuse("tie_word_embeddings", "true (the output layer is the token embedding)")
    epsilon = config.get("layer_norm_epsilon", 1e-5)
    if not isinstance(epsilon, (int, float)) or not math.isclose(epsilon, LAYER_NORM_EPSILON, rel_tol=1e-9):
        refuse("layer_norm_epsilon", f"{LAYER_NORM_EPSILON:g}")
    if config.get("scale_attn_weights", True) is not True:
        refuse("scale_attn_weights", "true (attention scaled by 1/sqrt(head size))")
    if config.get("scale_attn_by_inverse_layer_idx", False) is not False:
        refuse("scale_attn_by_inverse_layer_idx", "false")
    if config.get("add_cross_attention", False) is not False:
        refuse("add_cross_attention", "false")
    shape = {}
    for ours, theirs in (("n_vocab", "vocab_size"), ("n_ctx", "n_positions"), ("n_embd", "n_embd"),
                         ("n_head", "n_head"), ("n_layer", "n_layer")):
        value = config.get(theirs)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            refuse(theirs, "a positive integer")
        shape[ours] = value
    n_inner = config.get("n_inner")
    if n_inner is not None and n_inner != 4 * shape["n_embd"]:
        refuse("n_inner", f"null or 4 * n_embd = {4 * shape['n_embd']}")
    dropout = {name: config[name] for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop") if name in config}
    return HParams(**shape, **dropout).validate(f"{where}: ")


def config_from_hparams(hparams: HParams, encoding_name: str, architecture: str) -> dict:
    """A transformers GPT2Config (as `config.json`) for our model."""
    special = GPT2_EOS_TOKEN if encoding_name == "main" else None  # the `test` encoding has no <|endoftext|>
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": hparams.n_vocab,
        "n_positions": hparams.n_ctx,
        "n_ctx": hparams.n_ctx,
        "n_embd": hparams.n_embd,
        "n_layer": hparams.n_layer,
        "n_head": hparams.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": hparams.resid_pdrop,
        "embd_pdrop": hparams.embd_pdrop,
        "attn_pdrop": hparams.attn_pdrop,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": special,
        "eos_token_id": special,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def read_hparams(directory) -> HParams:
    return hparams_from_config(read_config(directory), os.path.join(os.fspath(directory), CONFIG))


# ----- encoding -----------------------------------------------------------------------------------------------------

@functools.cache
def _gpt2_tokenizer_files() -> tuple[str, tuple[str, ...]]:
    """GPT-2's vocabulary (canonical JSON) and merges (lines without the #version header), our `main` copy."""
    directory = encodings._find_encoder_dir(None)
    return _canonical_vocab(os.path.join(directory, "encoder.json")), \
        _merges(os.path.join(directory, "vocab.bpe"))


def _canonical_vocab(path) -> str:
    with open(path, encoding="utf-8") as f:
        return json.dumps(json.load(f), sort_keys=True)


def _merges(path) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f.read().split("\n") if line.strip() and not line.startswith("#version"))


def encoding_name(directory) -> str:
    """The encoding of a Hugging Face model directory (see the module docstring)."""
    directory = os.path.expanduser(os.fspath(directory))
    path = os.path.join(directory, ENCODING_FILE)
    if os.path.isfile(path):
        name = files.read_json(path)
        if not isinstance(name, str):
            raise ValueError(f"{path}: expected a JSON string naming the encoding (e.g. \"main\"), got {name!r}")
        return name
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        vocab_size = read_config(directory).get("vocab_size")
        if vocab_size == encodings.MainEncoding().n_vocab:
            return "main"  # weights without tokenizer files: GPT-2's own vocabulary size, so GPT-2's BPE
        raise ValueError(f"{directory}: no {' or '.join(TOKENIZER_FILES)} and vocab_size {vocab_size} is not "
                         f"GPT-2's 50257; add GPT-2's tokenizer files, or an `{ENCODING_FILE}` file naming one of "
                         f"{', '.join(encodings.ENCODINGS)} as a JSON string")
    if len(present) < len(TOKENIZER_FILES):
        missing = [name for name in TOKENIZER_FILES if name not in present]
        raise ValueError(f"{directory}: has {present[0]} but no {missing[0]}; GPT-2's tokenizer needs both")
    vocab, merges = _gpt2_tokenizer_files()
    for name, ours, theirs in (("vocab.json", vocab, lambda p: _canonical_vocab(p)), ("merges.txt", merges, _merges)):
        if theirs(os.path.join(directory, name)) != ours:
            raise ValueError(f"{os.path.join(directory, name)} is not GPT-2's: only GPT-2's byte-level BPE "
                             f"tokenizer (the `main` encoding) is supported")
    return "main"


# ----- weights ------------------------------------------------------------------------------------------------------

def _read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy arrays (bfloat16, which numpy lacks, included)."""
    from safetensors import SafetensorError, safe_open
    tensors = {}
    try:
        with safe_open(path, framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file handle, not a dict)
                if f.get_slice(name).get_dtype() == "BF16":
                    tensors[name] = _read_bfloat16(path, name)
                else:
                    tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors


def _read_bfloat16(path, name) -> np.ndarray:
    """A bfloat16 tensor widened to float32: its 16 bits are the high half of a float32."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_length))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + header_length + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def weight_files(directory) -> list[str]:
    directory = os.path.expanduser(os.fspath(directory))
    single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = files.read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected an object with a weight_map {{tensor: file}}")
        return [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    other = [name for name in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(directory, name))]
    hint = f" (it has {other[0]}: save the model with safe_serialization=True)" if other else ""
    raise ValueError(f"{directory}: no {WEIGHTS} or {WEIGHTS_INDEX}; only safetensors weights are read{hint}")


def _name_pairs(n_layer: int) -> list[tuple[str, str]]:
    """(our name under model/, HF GPT2Model name) for every trunk weight."""
    pairs = [("wte", "wte.weight"), ("wpe", "wpe.weight")]
    for layer in range(n_layer):
        for norm in ("ln_1", "ln_2"):
            pairs += [(f"h{layer}/{norm}/g", f"h.{layer}.{norm}.weight"), (f"h{layer}/{norm}/b", f"h.{layer}.{norm}.bias")]
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            theirs = f"h.{layer}.{conv.replace('/', '.')}"
            pairs += [(f"h{layer}/{conv}/w", f"{theirs}.weight"), (f"h{layer}/{conv}/b", f"{theirs}.bias")]
    return pairs + [("ln_f/g", "ln_f.weight"), ("ln_f/b", "ln_f.bias")]


def _is_conv_weight(ours: str) -> bool:
    return ours.endswith("/w")


def _expected_shape(ours: str, hp: HParams) -> list[int]:
    """Our variable's shape (GPT-2's layout)."""
    leaf = ours.split("/")
    if ours == "wte":
        return [hp.n_vocab, hp.n_embd]
    if ours == "wpe":
        return [hp.n_ctx, hp.n_embd]
    width = {"c_attn": 3 * hp.n_embd, "c_fc": 4 * hp.n_embd}.get(leaf[-2], hp.n_embd)
    if leaf[-1] == "w":
        n_in = 4 * hp.n_embd if leaf[-3:-1] == ["mlp", "c_proj"] else hp.n_embd
        return [1, n_in, width]
    return [width]


def trunk_from_hf(tensors: dict[str, np.ndarray], hp: HParams, where: str) -> dict[str, np.ndarray]:
    """Our `model/...` variables from HF GPT-2 tensors (see the module docstring). Shapes must agree with the
    config; missing tensors are an error naming them; tensors of other heads are ignored with a warning."""
    prefix = "transformer." if any(name.startswith("transformer.") for name in tensors) else ""
    plain = {name.removeprefix(prefix): value for name, value in tensors.items()}
    ours, used = {}, set()
    for name, theirs in _name_pairs(hp.n_layer):
        if theirs not in plain:
            raise ValueError(f"{where}: no tensor {prefix}{theirs}; expected a GPT-2 model with n_layer={hp.n_layer} "
                             f"(names as transformers' GPT2Model / GPT2LMHeadModel save them)")
        value = plain[theirs][None] if _is_conv_weight(name) else plain[theirs]
        expected = _expected_shape(name, hp)
        if list(value.shape) != expected:
            raise ValueError(f"{where}: {prefix}{theirs} has shape {list(plain[theirs].shape)}, but config.json's "
                             f"sizes give {expected[1:] if _is_conv_weight(name) else expected}")
        ours[f"model/{name}"] = value
        used.add(theirs)
    if "lm_head.weight" in plain:
        used.add("lm_head.weight")
        if not np.array_equal(plain["lm_head.weight"], plain["wte.weight"]):
            raise ValueError(f"{where}: lm_head.weight differs from wte.weight; only GPT-2's tied output "
                             f"embedding is supported")
    ignored = sorted(name for name in plain if name not in used and not _MASK_BUFFER.match(name))
    if ignored:
        warnings.warn(f"{where}: ignored tensors that are not GPT-2's trunk: {', '.join(ignored)}", stacklevel=3)
    return ours


def trunk_to_hf(variables: dict[str, np.ndarray], hp: HParams, prefix: str) -> dict[str, np.ndarray]:
    """HF GPT2Model tensors from our variables named `prefix` + `model/...` (e.g. prefix `policy/`)."""
    tensors = {}
    for ours, theirs in _name_pairs(hp.n_layer):
        value = np.asarray(variables[f"{prefix}model/{ours}"], np.float32)
        tensors[theirs] = np.ascontiguousarray(value[0] if _is_conv_weight(ours) else value)
    return tensors


def _read_head(path, n_embd: int) -> tuple[np.ndarray, np.ndarray]:
    head = _read_safetensors(path)
    for name, shape in (("weight", [n_embd]), ("bias", [])):
        if name not in head or list(head[name].shape) != shape:
            raise ValueError(f"{path}: expected a tensor `{name}` of shape {shape}")
    return head["weight"], head["bias"]


def _read_reward_norm(path) -> tuple[float, float]:
    norm = files.read_json(path)
    if not isinstance(norm, dict) or not all(isinstance(norm.get(k), (int, float)) for k in ("gain", "bias")):
        raise ValueError(f"{path}: expected a JSON object with numbers `gain` and `bias`")
    return float(norm["gain"]), float(norm["bias"])


def read_variables(directory, hp: HParams) -> dict[str, np.ndarray]:
    """Every weight of a Hugging Face model directory under our checkpoint names (GPT-2 layout, scalar heads and
    the reward normalisation when their files are there)."""
    directory = os.path.expanduser(os.fspath(directory))
    tensors = {}
    for path in weight_files(directory):
        tensors.update(_read_safetensors(path))
    variables = trunk_from_hf(tensors, hp, where=directory)
    for filename, head in ((VALUE_HEAD, "value"), (REWARD_HEAD, "reward")):
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            variables[f"model/heads/{head}/w"], variables[f"model/heads/{head}/b"] = _read_head(path, hp.n_embd)
    path = os.path.join(directory, REWARD_HEAD_JSON)
    if os.path.isfile(path):
        gain, bias = _read_reward_norm(path)
        variables["reward_norm/gain"], variables["reward_norm/bias"] = np.float32(gain), np.float32(bias)
    return variables


def write_checkpoint(variables: dict[str, np.ndarray], prefix: str):
    """A TensorFlow (V2) checkpoint `prefix.{index,data-00000-of-00001}` holding `variables` {name: array}."""
    import tensorflow.compat.v1 as tf
    names = sorted(variables)
    with tf.Graph().as_default():
        inputs = [tf.placeholder(tf.float32, np.shape(variables[name])) for name in names]
        save = tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                                 tensors=inputs)
        with tf.Session() as session:
            session.run(save, {ph: np.asarray(variables[name], np.float32) for ph, name in zip(inputs, names)})


def converted_checkpoint(directory, hp: HParams) -> str:
    """The TensorFlow checkpoint of a Hugging Face model directory, converted once and kept in the file cache
    under a key made of the source files' paths, sizes and modification times."""
    directory = os.path.realpath(os.path.expanduser(os.fspath(directory)))
    sources = [*weight_files(directory)] + [os.path.join(directory, name) for name in
                                             (CONFIG, VALUE_HEAD, REWARD_HEAD, REWARD_HEAD_JSON)]
    fingerprint = [_CONVERSION_VERSION]
    for path in sources:
        if os.path.isfile(path):
            stat = os.stat(path)
            fingerprint.append([os.path.realpath(path), stat.st_size, stat.st_mtime_ns])
    key = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:24]
    root = os.path.join(files.cache_dir(), "huggingface")
    final = os.path.join(root, key)
    prefix = os.path.join(final, "model.ckpt")
    if os.path.isfile(prefix + ".index"):
        return prefix
    variables = read_variables(directory, hp)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(dir=root, prefix=f".{key}.")
    try:
        write_checkpoint(variables, os.path.join(staging, "model.ckpt"))
        files.write_text_atomic(os.path.join(staging, "source"), directory + "\n")
        try:
            os.rename(staging, final)  # whole or not at all; another process may have won the race
        except OSError:
            if not os.path.isfile(prefix + ".index"):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return prefix


# ----- export -------------------------------------------------------------------------------------------------------

SCOPES = ("policy", "reward_model")
_RUN_HPARAMS = {"policy": "train_policy_hparams.json", "reward_model": "train_reward_hparams.json"}
_SUMMARY_TAGS = {  # what the model card reports from the run's TensorBoard logs
    "policy": ("ppo", ["objective/score", "objective/kl", "objective/kl_coef", "objective/score_total",
                       "objective/entropy", "elapsed/episodes"]),
    "reward_model": ("reward_model", ["train_reward/minibatch/loss", "train_reward/minibatch/accuracy"]),
}


def _model_dir(save_dir: str, scope: str) -> str:
    """SAVE_DIR/SCOPE of a run, or SAVE_DIR itself when it is that component (holds hparams.json)."""
    component = files.join(save_dir, scope)
    if not files.is_remote(save_dir):
        local = os.path.expanduser(save_dir)
        if not os.path.isdir(local):
            raise ValueError(f"export: SAVE_DIR {save_dir} is not a directory; expected a train_policy or "
                             f"train_reward run directory")
        if not os.path.isfile(os.path.join(local, scope, "hparams.json")):
            if os.path.isfile(os.path.join(local, "hparams.json")):
                return local
            raise ValueError(f"export: {save_dir} has no {scope}/hparams.json; expected a run directory holding "
                             f"{scope}/ (--scope is one of {', '.join(SCOPES)})")
    return component


def _run_summary(run_dir: str, scope: str) -> dict[str, float]:
    """The last logged value of each of the scope's summary tags found in RUN_DIR/tb (local runs only)."""
    if files.is_remote(run_dir):
        return {}
    from lm_human_preferences.utils import stats
    logdir = os.path.join(os.path.expanduser(run_dir), "tb", _SUMMARY_TAGS[scope][0])
    if not os.path.isdir(logdir):
        return {}
    scalars = stats.read_scalars(logdir)
    return {tag: scalars[tag][-1][1] for tag in _SUMMARY_TAGS[scope][1] if scalars.get(tag)}


def _checkpoint_step(checkpoint: str) -> int | None:
    match = re.search(r"-(\d+)$", checkpoint)
    return int(match.group(1)) if match else None


def _scalar(reader, name: str, checkpoint: str) -> np.ndarray:
    if not reader.has_tensor(name):
        raise ValueError(f"{checkpoint}: no variable {name}; expected a saved model of this scope")
    return reader.get_tensor(name)


def export(save_dir: str, out_dir: str, scope: str = "policy") -> str:
    """Write SAVE_DIR's policy (or reward model) to OUT_DIR as a Hugging Face GPT-2 directory (module docstring).
    OUT_DIR must not exist or be empty; it is written in a temporary directory beside it and renamed into place,
    so it is complete or absent. Returns OUT_DIR."""
    import tensorflow.compat.v1 as tf

    from lm_human_preferences.language.trained_models import TrainedModel

    if scope not in SCOPES:
        raise ValueError(f"export: --scope {scope!r} is not one of {', '.join(SCOPES)}")
    save_dir, out_dir = os.fspath(save_dir), os.fspath(out_dir)
    if files.is_remote(out_dir):
        raise ValueError(f"export: OUT_DIR {out_dir} must be a local directory (upload it afterwards)")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise ValueError(f"export: OUT_DIR {out_dir} exists and is not an empty directory; choose a new one")
    model_dir = _model_dir(save_dir, scope)
    trained = TrainedModel(scope, savedir=model_dir, scope=scope)
    hp, encoding = trained.hparams(), trained.encoding
    checkpoint = trained.checkpoint()
    reader = tf.train.load_checkpoint(checkpoint)
    old_scope = trained._checkpoint_scope(dict(tf.train.list_variables(checkpoint)), checkpoint)
    prefix = f"{old_scope}/" if old_scope else ""
    variables = {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(checkpoint)
                 if name.startswith(f"{prefix}model/")}
    for name, _ in _name_pairs(hp.n_layer):
        if f"{prefix}model/{name}" not in variables:
            raise ValueError(f"{checkpoint}: no variable {prefix}model/{name}; expected a GPT-2 model under {scope}/")

    run_dir = files.join(model_dir, "..") if files.is_remote(model_dir) else os.path.dirname(os.path.abspath(
        os.path.expanduser(model_dir)))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.export-")
    try:
        _write_export(staging, scope, hp, encoding.name, variables, prefix, reader, checkpoint, run_dir, model_dir)
        umask = _umask()  # mkdtemp and safetensors make private files; give the usual permissions
        os.chmod(staging, 0o777 & ~umask)
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o666 & ~umask)
        os.rename(staging, out_dir)  # replaces an empty OUT_DIR; a non-empty one (made meanwhile) fails
    except OSError as error:
        raise ValueError(f"export: could not write {out_dir}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _write_export(directory, scope, hp: HParams, encoding_name, variables, prefix, reader, checkpoint, run_dir,
                  model_dir):
    from safetensors.numpy import save_file
    architecture = "GPT2LMHeadModel" if scope == "policy" else "GPT2Model"
    _write_json(os.path.join(directory, CONFIG), config_from_hparams(hp, encoding_name, architecture))
    # transformers refuses a safetensors file without format metadata; "pt" is what it writes itself.
    save_file(trunk_to_hf(variables, hp, prefix), os.path.join(directory, WEIGHTS), metadata={"format": "pt"})
    _write_json(os.path.join(directory, ENCODING_FILE), encoding_name)
    if encoding_name == "main":
        source = encodings._find_encoder_dir(None)
        shutil.copyfile(os.path.join(source, "encoder.json"), os.path.join(directory, "vocab.json"))
        shutil.copyfile(os.path.join(source, "vocab.bpe"), os.path.join(directory, "merges.txt"))
        _write_json(os.path.join(directory, "tokenizer_config.json"), {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": hp.n_ctx, "add_prefix_space": False,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    head_files = []
    if scope == "policy":
        if f"{prefix}model/heads/value/w" in variables:
            save_file({"weight": variables[f"{prefix}model/heads/value/w"],
                       "bias": np.asarray(variables[f"{prefix}model/heads/value/b"], np.float32)},
                      os.path.join(directory, VALUE_HEAD), metadata={"format": "np"})
            head_files.append(VALUE_HEAD)
    else:
        weight = _scalar(reader, f"{prefix}model/heads/reward/w", checkpoint)
        bias = _scalar(reader, f"{prefix}model/heads/reward/b", checkpoint)
        gain = float(_scalar(reader, f"{prefix}reward_norm/gain", checkpoint))
        norm_bias = float(_scalar(reader, f"{prefix}reward_norm/bias", checkpoint))
        save_file({"weight": weight, "bias": np.asarray(bias, np.float32)}, os.path.join(directory, REWARD_HEAD),
                  metadata={"format": "np"})
        _write_json(os.path.join(directory, REWARD_HEAD_JSON), {
            "gain": gain, "bias": norm_bias,
            "reward": "gain * (hidden_last . weight + head_bias) + bias, where weight and head_bias are "
                      "reward_head.safetensors' weight and bias and hidden_last is the final hidden state (after "
                      "ln_f) at the last real token of query + response"})
        head_files += [REWARD_HEAD, REWARD_HEAD_JSON]
    hparams_file = _RUN_HPARAMS[scope]
    hparams_path = files.join(run_dir, hparams_file)
    copied = None
    if not files.is_remote(run_dir) and os.path.isfile(hparams_path):
        shutil.copyfile(hparams_path, os.path.join(directory, hparams_file))
        copied = hparams_file
    card = model_card(scope=scope, hp=hp, encoding_name=encoding_name, model_dir=model_dir, checkpoint=checkpoint,
                      run_dir=run_dir, hparams_file=copied, head_files=head_files,
                      summary=_run_summary(run_dir, scope))
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)


def _hparams_lines(path: str | None, scope: str) -> list[str]:
    """Key settings of the run from its hyperparameters file, as markdown list items."""
    if path is None:
        return []
    with open(path, encoding="utf-8") as f:
        hparams = json.load(f)

    def get(dotted):
        value = hparams
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value

    keys = ["task.policy.initial_model", "task.query_dataset", "task.query_length", "task.response_length",
            "task.policy.temperature", "run.seed"]
    keys += ["rewards.trained_model", "rewards.kl_coef", "rewards.adaptive_kl", "ppo.total_episodes", "ppo.batch_size",
             "ppo.lr"] if scope == "policy" else ["labels.type", "labels.source", "labels.num_train", "batch_size", "lr"]
    return [f"- `{key}`: `{json.dumps(get(key))}`" for key in keys if get(key) is not None]


def model_card(*, scope, hp: HParams, encoding_name, model_dir, checkpoint, run_dir, hparams_file, head_files,
               summary: dict[str, float]) -> str:
    """README.md of an export: what the run was and how to use the files."""
    step = _checkpoint_step(checkpoint)
    what = "PPO-fine-tuned GPT-2 policy" if scope == "policy" else "GPT-2 reward model"
    command = "train_policy" if scope == "policy" else "train_reward"
    lines = ["---", "library_name: transformers",
             f"pipeline_tag: {'text-generation' if scope == 'policy' else 'feature-extraction'}",
             "tags: [gpt2, rlhf, lm-human-preferences]", "---", "",
             f"# {os.path.basename(os.path.normpath(run_dir))}: {what}", "",
             (f"Exported by `./launch.py export` of lm-human-preferences (a rebuild of Ziegler et al. 2019, "
              f"*Fine-Tuning Language Models from Human Preferences*) on "
              f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}."), "",
             "## The run", "",
             (f"- run directory: `{run_dir}` (`./launch.py {command} EXPERIMENT NAME` saves to SAVE_DIR/NAME; "
              f"a saved run does not record the experiment's name, its hyperparameters are below)"),
             f"- model: `{model_dir}`, checkpoint `{os.path.basename(checkpoint)}`"
             + (f" (step {step})" if step is not None else ""),
             (f"- shape: n_layer {hp.n_layer}, n_embd {hp.n_embd}, n_head {hp.n_head}, n_ctx {hp.n_ctx}, "
              f"n_vocab {hp.n_vocab}; encoding `{encoding_name}`")]
    if hparams_file:
        lines.append(f"- hyperparameters: `{hparams_file}` (copied from the run); among them:")
        lines += ["  " + line for line in _hparams_lines(os.path.join(os.path.expanduser(run_dir), hparams_file), scope)]
    else:
        lines.append(f"- hyperparameters: the run's `{_RUN_HPARAMS[scope]}` was not found")
    if summary:
        lines += ["", "Last values logged by the run (TensorBoard, `tb/" + _SUMMARY_TAGS[scope][0] + "`):", ""]
        lines += [f"- `{tag}`: {value:.6g}" for tag, value in summary.items()]
    else:
        lines += ["", "No training statistics were found (`tb/` of the run)."]
    lines += ["", "## Files", "",
              (f"- `config.json`, `model.safetensors`: the GPT-2 trunk in transformers' format "
               f"(`{'GPT2LMHeadModel' if scope == 'policy' else 'GPT2Model'}`, tied output embedding)."),
              f"- `encoding`: the lm-human-preferences encoding (`{encoding_name}`)."]
    if encoding_name == "main":
        lines.append("- `vocab.json`, `merges.txt`, `tokenizer_config.json`: GPT-2's tokenizer. lm-human-preferences "
                     "encodes the text `<|endoftext|>` as ordinary text, as GPT-2's original encoder did, while "
                     "transformers' tokenizer reads it as token 50256; its padding token (50259) is never fed to "
                     "the model.")
    else:
        lines.append("- no tokenizer files: the `test` encoding is one token per character of "
                     "`abcdefghijklmnopqrstuvwxyz.` (ids 0-26).")
    if hparams_file:
        lines.append(f"- `{hparams_file}`: every hyperparameter of the run.")
    lines += ["", "## Head", "", HEADS_DOC[scope] if head_files else "This policy was saved without a value head.",
              ""]
    lines += ["## Loading", "", "```python",
              "from transformers import GPT2LMHeadModel, AutoTokenizer" if scope == "policy" else
              "from transformers import GPT2Model",
              "model = GPT2LMHeadModel.from_pretrained(OUT_DIR)" if scope == "policy" else
              "model = GPT2Model.from_pretrained(OUT_DIR)"]
    if scope == "policy" and encoding_name == "main":
        lines.append("tokenizer = AutoTokenizer.from_pretrained(OUT_DIR)")
    lines += ["```", "",
              "lm-human-preferences reads this directory back as a model: `--task.policy.initial_model OUT_DIR`"
              + ("" if scope == "policy" else " or `--rewards.trained_model OUT_DIR`") + ".", ""]
    return "\n".join(lines)
