"""Where a language model's shape, encoding and weights come from.

`TrainedModel(name, *, savedir=None, scope=None)` names one of:

* a built-in random model (`test`, `demo`): no files, weights drawn with a fixed seed (below); a random
  model of any other shape comes from `TrainedModel.random(name, hparams, encoding)` (benchmarks);
* a released GPT-2 size (`124M`, `355M`, `774M`, `1558M`), fetched from the GPT-2 bucket;
* a directory or URL holding a model: a GPT-2 model directory (`hparams.json`, `checkpoint`, `model.ckpt.*`)
  or a saved run component such as `SAVE_DIR/policy` (`hparams.json`, `encoding`, `checkpoints/`);
* a Hugging Face GPT-2 directory (`config.json`, `model.safetensors`, `vocab.json`, `merges.txt`), e.g. what
  `./launch.py export` writes, or `hf:OWNER/NAME[@REVISION]`, such a directory on the Hugging Face Hub (see hf.py:
  the weights are converted once into a TensorFlow checkpoint in the file cache, then load as any other).
  `savedir` gives that location when `name` is only a label (e.g. `TrainedModel("policy", savedir=...)`).

A built-in random model has no checkpoint (`checkpoint()` is None), but its weights are drawn once per
process with a fixed seed, so every scope built from it (policy, ref_policy, reward_model) starts from the same
trunk, as it would from GPT-2: the reference policy equals the initial policy and the initial KL is 0.

`scope` is the variable scope the checkpoint's model lives under (`policy` for `SAVE_DIR/policy`, nothing for
GPT-2, whose variables are `model/...`); when not given it is read off the checkpoint. `init_op` routes a
checkpoint's `scope/X` into our `new_scope/X` through `tf.train.init_from_checkpoint`, so the ordinary global
variables initialiser loads the weights.
"""

import atexit
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple

from lm_human_preferences.language import encodings, hf
from lm_human_preferences.hparams import ModelHParams as HParams
from lm_human_preferences.utils import files

GPT2_MODELS_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
GPT2_SIZES = ("124M", "355M", "774M", "1558M")

# Random models that need no files: `test` for unit tests, `demo` for the offline CPU demo.
BUILTIN_MODELS = {
    "test": dict(encoding="test", hparams=dict(n_vocab=27, n_ctx=8, n_embd=7, n_head=1, n_layer=2)),
    "demo": dict(encoding="test", hparams=dict(n_vocab=27, n_ctx=64, n_embd=32, n_head=4, n_layer=2)),
}

# Seed of the built-in random models' weights (the same in every process and rank).
RANDOM_MODEL_SEED = 0
_random_checkpoints: Dict[str, str] = {}  # random model spec (JSON) -> checkpoint of its weights, once per process

# TensorFlow's Saver writes a single data shard unless told otherwise; every released checkpoint has one.
CHECKPOINT_DATA_SUFFIX = ".data-00000-of-00001"

# Optimizer state saved next to the weights (Adam slots, beta powers, step counters): never a model weight.
_OPTIMIZER_STATE = re.compile(
    r"(^|/)(Adam(_\d+)?|beta[12]_power(_\d+)?|global_step|Momentum|RMSProp(_\d+)?|Adagrad|accumulators)(/|$)")


def is_optimizer_state(name: str) -> bool:
    return bool(_OPTIMIZER_STATE.search(name))


def write_model_files(model_dir, hparams: HParams, encoding_name: str):
    """Write the files that make `model_dir` loadable by TrainedModel: hparams.json and encoding.
    The weights go to `model_dir/checkpoints/` through a tf Saver."""
    files.write_text_atomic(os.path.join(model_dir, "hparams.json"), hparams.to_json() + "\n")
    files.write_text_atomic(os.path.join(model_dir, "encoding"), json.dumps(encoding_name) + "\n")


def save_model(sess, saver, model_dir, hparams: HParams, encoding_name: str, step: Optional[int]):
    """Save a model in the run layout: hparams.json, encoding, checkpoints/model.ckpt-STEP (or model.ckpt when
    step is None, as 2019 saved reward models). Make `saver` with save_relative_paths=True so that the run
    directory can be moved."""
    from lm_human_preferences.trainer import quiet_tensorflow_warnings
    write_model_files(model_dir, hparams, encoding_name)
    with quiet_tensorflow_warnings():
        saver.save(sess, os.path.join(model_dir, "checkpoints", "model.ckpt"), global_step=step)


def _named_checkpoint(state_text: str) -> Optional[str]:
    """The file name of the checkpoint a TensorFlow checkpoint state file names (its model_checkpoint_path, written
    where training ran: maybe absolute, maybe on another machine), or None when it names none."""
    match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state_text, re.MULTILINE)
    return re.split(r"[/\\]", match.group(1))[-1] if match else None


def missing_files(savedir: Optional[str]) -> List[Tuple[str, str]]:
    """(URL, cache path) of each file that loading the model at `savedir` reads and the cache lacks: what to copy
    where to load it offline; [] for a local directory. A GPT-2 size reads hparams.json, checkpoint and
    model.ckpt.index/.data-00000-of-00001. Another URL is read as a saved run's model (encoding, hparams.json,
    checkpoints/checkpoint and the checkpoint that names), unless a cached `checkpoint` beside its hparams.json
    shows a GPT-2 model directory. While the state file is not in the cache, the checkpoint's name is unknown:
    the last entry then names its files and the directory they go to."""
    if savedir is None or not files.is_remote(savedir):
        return []
    released = savedir.rstrip("/") in [f"{GPT2_MODELS_URL}/{size}" for size in GPT2_SIZES]
    gpt2_layout = released or os.path.isfile(files.cache_path(files.join(savedir, "checkpoint")))
    directory = savedir if gpt2_layout else files.join(savedir, "checkpoints")
    state = files.join(directory, "checkpoint")
    urls = ([] if gpt2_layout else [files.join(savedir, "encoding")]) + [files.join(savedir, "hparams.json"), state]
    if os.path.isfile(files.cache_path(state)):
        with open(files.cache_path(state), encoding="utf-8") as f:
            name = _named_checkpoint(f.read())
    else:
        name = "model.ckpt" if released else None  # what the GPT-2 bucket's state files name
    if name is not None:
        urls += [files.join(directory, name + ".index"), files.join(directory, name + CHECKPOINT_DATA_SUFFIX)]
    missing = files.not_cached(urls)
    if name is None:
        missing.append((f"the .index and {CHECKPOINT_DATA_SUFFIX} files of the checkpoint {state} names",
                        os.path.dirname(files.cache_path(state)) + os.sep))
    return missing


def _known_names():
    return ", ".join([*BUILTIN_MODELS, *GPT2_SIZES, "hf:OWNER/NAME[@REVISION]"])


class TrainedModel:
    """A language model's hparams, encoding and checkpoint; see the module docstring for the names accepted."""

    def __init__(self, name: str, *, savedir: Optional[str] = None, scope: Optional[str] = None):
        self.name = name
        self.scope = scope
        if savedir is None:
            if name in BUILTIN_MODELS:
                savedir = None
            elif name in GPT2_SIZES:
                savedir = f"{GPT2_MODELS_URL}/{name}"
            elif hf.is_hub_name(name):
                savedir = name
            elif files.is_remote(name) or os.path.isdir(os.path.expanduser(name)):
                savedir = name
            else:
                raise ValueError(f"unknown model {name!r}: expected one of {_known_names()}, a local directory or "
                                 f"a URL holding hparams.json and a checkpoint, or a Hugging Face GPT-2 directory (config.json, "
                                 f"model.safetensors)")
        self._set_source(savedir, BUILTIN_MODELS.get(name) if savedir is None else None)

    @classmethod
    def random(cls, name: str, hparams: HParams, encoding: str) -> "TrainedModel":
        """A model of any shape with random weights and no files, e.g. a GPT-2 124M-shaped model for benchmarks.
        Like `test` and `demo`, its weights are drawn once per process with RANDOM_MODEL_SEED, so every scope
        built from it starts from the same trunk. `name` labels it (it must not be a built-in or GPT-2 name)."""
        if name in BUILTIN_MODELS or name in GPT2_SIZES:
            raise ValueError(f"TrainedModel.random: {name!r} names a built-in model; choose another label")
        model = cls.__new__(cls)
        model.name, model.scope = name, None
        model._set_source(None, dict(encoding=encoding, hparams=hparams.to_nested_dict()))
        return model

    def _set_source(self, savedir: Optional[str], random_spec: Optional[dict]):
        """Files at `savedir` (an `hf:` name is fetched first), or (savedir None) random weights of `random_spec`
        {encoding, hparams}."""
        if hf.is_hub_name(savedir):
            savedir = hf.download(savedir)
        self.savedir = savedir
        self.is_huggingface = hf.is_model_dir(savedir)
        self._random_spec = random_spec
        with self.fetching():
            self.encoding = encodings.get(self._encoding_name())
        self._hparams: Optional[HParams] = None
        self._checkpoint: Optional[str] = None

    def __repr__(self):
        return f"TrainedModel({self.name!r}, savedir={self.savedir!r}, scope={self.scope!r})"

    def fetching(self):
        """A context in which a file of this model that cannot be fetched (offline) is a files.MissingFiles error
        (a ValueError) listing every file of the model not in the cache, with the cache path to copy it to."""
        return files.fetching_together(f"model {self.savedir}", lambda: missing_files(self.savedir))

    @property
    def is_random(self) -> bool:
        """A built-in or `random()` model: no files; its weights are drawn with RANDOM_MODEL_SEED."""
        return self.savedir is None

    def _encoding_name(self) -> str:
        if self.is_random:
            return self._random_spec["encoding"]
        if self.savedir == f"{GPT2_MODELS_URL}/{self.name}":
            return "main"
        if self.is_huggingface:
            return hf.encoding_name(self.savedir)
        path = files.join(self.savedir, "encoding")
        if not files.exists(path):
            return "main"  # a GPT-2 model directory: byte-level BPE (its encoder.json / vocab.bpe are GPT-2's)
        name = files.read_json(path)
        if not isinstance(name, str):
            raise ValueError(f"{path}: expected a JSON string naming the encoding (e.g. \"main\"), got {name!r}")
        return name

    # ----- shape -----------------------------------------------------------------------------------------------
    def hparams(self) -> HParams:
        if self._hparams is None:
            if self.is_random:
                hparams = HParams(**self._random_spec["hparams"]).validate()
            elif self.is_huggingface:
                hparams = hf.read_hparams(self.savedir)
            else:
                path = files.join(self.savedir, "hparams.json")
                with self.fetching():
                    hparams = HParams.from_json_dict(files.read_json(path), where=path)
            if hparams.n_vocab != self.encoding.n_vocab:
                raise ValueError(f"{self}: hparams n_vocab={hparams.n_vocab} does not match the {self.encoding.name!r} "
                                 f"encoding's {self.encoding.n_vocab} tokens; a saved model names its encoding in "
                                 f"its `encoding` file")
            self._hparams = hparams
        return self._hparams

    # ----- weights ---------------------------------------------------------------------------------------------
    def checkpoint(self) -> Optional[str]:
        """Local path prefix of the latest checkpoint (remote files are fetched), or None for random models."""
        if self.is_random:
            return None
        if self._checkpoint is None:
            if self.is_huggingface:
                self._checkpoint = hf.converted_checkpoint(self.savedir, self.hparams())
            else:
                with self.fetching():
                    self._checkpoint = self._fetch_checkpoint()
        return self._checkpoint

    def _fetch_checkpoint(self) -> str:
        # GPT-2 model directories keep the checkpoint next to hparams.json; saved runs in checkpoints/.
        places = [self.savedir, files.join(self.savedir, "checkpoints")]
        state, first_error = None, None
        for directory in places:
            try:
                if files.exists(files.join(directory, "checkpoint")):
                    state = files.join(directory, "checkpoint")
                    break
            except files.FileFetchError as error:  # offline: the other place may still be in the cache
                first_error = first_error or error
        if state is None:
            if first_error is not None:
                raise first_error
            raise ValueError(f"{self}: no TensorFlow checkpoint state file `checkpoint` in {' or '.join(places)}")
        name = _named_checkpoint(files.read_text(state))
        if name is None:
            raise ValueError(f"{state}: no model_checkpoint_path line (expected a TensorFlow checkpoint state file)")
        prefix = files.join(directory, name)
        index = files.local_path(prefix + ".index")
        if files.is_remote(prefix):  # the cache keeps the data shard next to the index, as the reader needs
            files.local_path(prefix + CHECKPOINT_DATA_SUFFIX)
        if not os.path.exists(index):
            raise ValueError(f"{state} names checkpoint {prefix}, but {index} does not exist")
        return index[:-len(".index")]

    def _random_weights(self) -> str:
        """A temporary checkpoint (GPT-2 layout) of this random model's trunk, drawn with RANDOM_MODEL_SEED."""
        key = json.dumps(self._random_spec, sort_keys=True)
        if key not in _random_checkpoints:
            import tensorflow.compat.v1 as tf
            from lm_human_preferences.language.model import Model

            directory = tempfile.mkdtemp(prefix=f"lmhp-{self.name}-weights-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            with tf.Graph().as_default():
                tf.set_random_seed(RANDOM_MODEL_SEED)
                Model(self.hparams(), scope="model")(tf.zeros([1, 1], tf.int32))
                with tf.Session() as session:
                    session.run(tf.global_variables_initializer())
                    _random_checkpoints[key] = tf.train.Saver().save(
                        session, os.path.join(directory, "model.ckpt"), write_meta_graph=False, write_state=False)
        return _random_checkpoints[key]

    def _checkpoint_scope(self, available: Dict[str, List[int]], checkpoint: str) -> str:
        """The scope the checkpoint's model sits under ('' for GPT-2's `model/...`)."""
        if self.scope is not None:
            return self.scope.strip("/")
        if "model/wte" in available:
            return ""
        scopes = sorted(name[:-len("/model/wte")] for name in available if name.endswith("/model/wte"))
        if len(scopes) != 1:
            found = f"several models ({', '.join(scopes)})" if scopes else "no GPT-2 weights (model/wte)"
            raise ValueError(f"{checkpoint}: found {found}; pass scope=... to TrainedModel to say which one to load")
        return scopes[0]

    def init_op(self, params, new_scope: str):
        """Make the global variables initialiser load `params` (our variables under `new_scope`) from the checkpoint.

        params: our variables (a list, or a dict {name: variable}). Returns {checkpoint name: variable}, what
        will be loaded. Shapes must agree (ValueError naming the variable); our variables the checkpoint lacks
        keep their initialisers and are reported (expected for a fresh value head on GPT-2); optimizer state
        on either side is ignored. Built-in random models load their seeded trunk the same way.
        """
        import tensorflow.compat.v1 as tf

        checkpoint = self.checkpoint() if not self.is_random else self._random_weights()
        variables = list(params.values()) if isinstance(params, dict) else list(params)
        available = dict(tf.train.list_variables(checkpoint))
        # Random weights and converted Hugging Face models are in GPT-2's layout, `model/...`, whatever `scope`.
        old_scope = "" if self.is_random or self.is_huggingface else self._checkpoint_scope(available, checkpoint)
        new_scope = new_scope.strip("/")
        assignment, missing = {}, []
        for variable in variables:
            name = variable.op.name
            if is_optimizer_state(name):
                continue
            if not name.startswith(new_scope + "/"):
                raise ValueError(f"init_op: variable {name} is not under new_scope {new_scope!r}")
            relative = name[len(new_scope) + 1:]
            checkpoint_name = f"{old_scope}/{relative}" if old_scope else relative
            if checkpoint_name not in available:
                missing.append(name)
                continue
            ours, theirs = variable.shape.as_list(), list(available[checkpoint_name])
            if ours != theirs:
                raise ValueError(f"{checkpoint}: variable {checkpoint_name} has shape {theirs}, but {name} has "
                                 f"shape {ours}; the checkpoint was made for another model size (check "
                                 f"{files.join(self.savedir, 'hparams.json')})")
            assignment[checkpoint_name] = variable
        if not assignment:
            raise ValueError(f"{checkpoint}: none of the {len(variables)} variables under {new_scope}/ are in the "
                             f"checkpoint (looked under scope {old_scope or '(none)'!r})")
        if missing and not self.is_random:  # random models have no head weights to report
            _report_missing(missing, checkpoint)
        tf.train.init_from_checkpoint(checkpoint, assignment)
        return assignment


def _report_missing(missing: List[str], checkpoint: str):
    from lm_human_preferences.utils import mpi
    if mpi.is_root():
        message = f"{len(missing)} parameters are not in {checkpoint} and keep their initial values: " + \
            ", ".join(missing)
        warnings.warn(message, stacklevel=3)
