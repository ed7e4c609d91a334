"""Hugging Face GPT-2 in and out (language/hf.py): an export checked against an independent numpy GPT-2 written with
Hugging Face's tensor names, the reward reproduced from the exported head files, import round trips, hf: names,
config refusals and the encoding check."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf
from safetensors.numpy import load_file, save_file

from lm_human_preferences.language import encodings, hf
from lm_human_preferences.language import model as lm_model
from lm_human_preferences.language.trained_models import TrainedModel, save_model
from lm_human_preferences.policy import Policy
from lm_human_preferences.rewards import RewardModel
from lm_human_preferences.utils import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `test` encoding (27 symbols, padding 27); two heads, so the head split is exercised.
HP = lm_model.HParams(n_vocab=27, n_ctx=8, n_embd=8, n_head=2, n_layer=2)
PAD = 27


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Converted checkpoints go to this test's own file cache."""
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))


def randomize(variables, sess, seed):
    """Weights large enough that logits, values and rewards differ clearly between tokens and positions."""
    rng = np.random.RandomState(seed)
    for var in variables:
        var.load(rng.normal(scale=0.5, size=var.shape.as_list()).astype(np.float32), sess)
    return {var.op.name: sess.run(var) for var in variables}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory as train_policy leaves it: policy/ (step 5), reward_model/, hyperparameters and TensorBoard
    logs, with random weights. Returns (run directory, {variable: value})."""
    run = tmp_path_factory.mktemp("run")
    values = {}
    with tf.Graph().as_default():
        policy = Policy(TrainedModel.random("tiny", HP, "test"), scope="policy")
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            values.update(randomize(policy.get_params(), sess, seed=1))
            save_model(sess, tf.train.Saver(policy.get_params(), save_relative_paths=True), str(run / "policy"), HP,
                       "test", step=5)
    with tf.Graph().as_default():
        reward_model = RewardModel(TrainedModel.random("tiny", HP, "test"), scope="reward_model")
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            values.update(randomize(reward_model.get_params(), sess, seed=2))
            for variable, value in ((reward_model.gain, 3.0), (reward_model.bias, -2.0)):  # a visible normalisation
                variable.load(value, sess)
                values[variable.op.name] = np.float32(value)
            save_model(sess, tf.train.Saver(reward_model.get_params(), save_relative_paths=True),
                       str(run / "reward_model"), HP, "test", step=None)
    (run / "train_policy_hparams.json").write_text(json.dumps({
        "task": {"policy": {"initial_model": "test"}, "query_length": 3}, "ppo": {"total_episodes": 640}}))
    logger = stats.StatsLogger(str(run / "tb" / "ppo"), enabled=True)
    for step, (score, kl) in enumerate([(0.5, 1.0), (1.25, 2.5)]):
        logger.write(step, {"objective/score": score, "objective/kl": kl})
    return run, values


@pytest.fixture(scope="module")
def exported(saved_run, tmp_path_factory):
    """The policy and the reward model of `saved_run`, exported."""
    run, _ = saved_run
    out = tmp_path_factory.mktemp("exports")
    return hf.export(str(run), str(out / "policy")), hf.export(str(run), str(out / "reward"), scope="reward_model")


# ----- an independent GPT-2 in numpy, with Hugging Face's names ---------------------------------------------------

def layer_norm(x, weight, bias, epsilon):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * weight + bias


def gelu_new(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def hf_gpt2_hidden(tensors, config, tokens):
    """transformers' GPT2Model.forward for one sequence of real tokens: the final hidden state [t, n_embd]."""
    t = len(tokens)
    n_head, n_embd, epsilon = config["n_head"], config["n_embd"], config["layer_norm_epsilon"]
    head_size = n_embd // n_head
    x = tensors["wte.weight"][tokens] + tensors["wpe.weight"][np.arange(t)]
    causal = np.tril(np.ones([t, t], bool))
    for layer in range(config["n_layer"]):
        p = f"h.{layer}."
        a = layer_norm(x, tensors[p + "ln_1.weight"], tensors[p + "ln_1.bias"], epsilon)
        qkv = a @ tensors[p + "attn.c_attn.weight"] + tensors[p + "attn.c_attn.bias"]  # Conv1D: x @ W[in, out]
        q, k, v = (part.reshape(t, n_head, head_size).transpose(1, 0, 2) for part in np.split(qkv, 3, axis=-1))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_size)  # [heads, t, t]
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        merged = (weights @ v).transpose(1, 0, 2).reshape(t, n_embd)
        x = x + merged @ tensors[p + "attn.c_proj.weight"] + tensors[p + "attn.c_proj.bias"]
        m = layer_norm(x, tensors[p + "ln_2.weight"], tensors[p + "ln_2.bias"], epsilon)
        m = gelu_new(m @ tensors[p + "mlp.c_fc.weight"] + tensors[p + "mlp.c_fc.bias"])
        x = x + m @ tensors[p + "mlp.c_proj.weight"] + tensors[p + "mlp.c_proj.bias"]
    return layer_norm(x, tensors["ln_f.weight"], tensors["ln_f.bias"], epsilon)


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def hf_names(n_layer):
    names = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    for layer in range(n_layer):
        for module in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            names |= {f"h.{layer}.{module}.weight", f"h.{layer}.{module}.bias"}
    return names


def read_export(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f), load_file(os.path.join(directory, "model.safetensors"))


SEQUENCES = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [26, 0, 0, 13, 7, 25, 8, 8]], np.int32)


# ----- out ----------------------------------------------------------------------------------------------------------

def test_exported_policy_gives_our_next_token_logprobs_and_values_through_a_numpy_gpt2(saved_run, exported):
    run, values = saved_run
    config, tensors = read_export(exported[0])
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == \
        dict(vocab_size=27, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert set(tensors) == hf_names(2)  # no lm_head.weight: tied to wte.weight
    assert tensors["h.1.attn.c_attn.weight"].shape == (8, 24)  # Conv1D [in, out]; ours [1, in, out]
    np.testing.assert_array_equal(tensors["h.1.mlp.c_proj.weight"], values["policy/model/h1/mlp/c_proj/w"][0])
    value_head = load_file(os.path.join(exported[0], "value_head.safetensors"))

    policy = Policy(TrainedModel("policy", savedir=str(run / "policy"), scope="policy"), scope="policy")
    outputs = policy.model(tf.constant(SEQUENCES))
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        ours = sess.run({"logits": outputs["lm_logits"], "value": outputs["value"]})
    for row, tokens in enumerate(SEQUENCES):
        hidden = hf_gpt2_hidden(tensors, config, tokens)
        theirs = log_softmax(hidden @ tensors["wte.weight"].T)  # tied output embedding
        np.testing.assert_allclose(theirs, log_softmax(ours["logits"][row]), atol=1e-4)
        np.testing.assert_allclose(hidden @ value_head["weight"] + value_head["bias"], ours["value"][row], atol=1e-4)
    assert np.ptp(theirs, axis=-1).min() > 1  # the comparison is not between near-uniform distributions


def test_exported_reward_model_reproduces_the_reward(saved_run, exported):
    run, _ = saved_run
    config, tensors = read_export(exported[1])
    assert config["architectures"] == ["GPT2Model"]
    head = load_file(os.path.join(exported[1], "reward_head.safetensors"))
    with open(os.path.join(exported[1], "reward_head.json")) as f:
        norm = json.load(f)
    queries = np.array([[1, 2, 3], [4, PAD, PAD], [5, 6, 7]], np.int32)  # right-padded queries
    responses = np.array([[8, 9, 10, 11], [12, 13, PAD, PAD], [14, 15, 16, 0]], np.int32)  # truncated responses

    reward_model = RewardModel(TrainedModel("reward_model", savedir=str(run / "reward_model"),
                                            scope="reward_model"))
    rewards_op = reward_model.get_rewards_op(tf.constant(queries), tf.constant(responses))
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        ours, gain, bias = sess.run([rewards_op, reward_model.gain, reward_model.bias])
    assert (norm["gain"], norm["bias"]) == (float(gain), float(bias)) == (3.0, -2.0)
    for row in range(len(queries)):
        tokens = [t for t in np.concatenate([queries[row], responses[row]]) if t != PAD]  # pads are never fed
        hidden_last = hf_gpt2_hidden(tensors, config, np.array(tokens))[-1]
        reward = norm["gain"] * (hidden_last @ head["weight"] + head["bias"]) + norm["bias"]
        np.testing.assert_allclose(reward, ours[row], atol=1e-4)
    assert np.ptp(ours) > 0.1


def test_export_writes_a_model_card_with_the_runs_numbers(exported):
    with open(os.path.join(exported[0], "README.md")) as f:
        card = f.read()
    for expected in ("step 5", "`objective/score`: 1.25", "`objective/kl`: 2.5", "train_policy_hparams.json",
                     "`ppo.total_episodes`: `640`", "value_head.safetensors"):
        assert expected in card
    assert os.path.isfile(os.path.join(exported[0], "train_policy_hparams.json"))
    with open(os.path.join(exported[1], "README.md")) as f:
        assert "reward_head.json" in f.read()


def test_export_refuses_a_non_empty_out_dir_and_writes_nothing(saved_run, tmp_path):
    run, _ = saved_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        hf.export(str(run), str(out))
    assert os.listdir(out) == ["keep.txt"] and set(os.listdir(tmp_path)) - {"cache"} == {"out"}  # no staging left
    empty = tmp_path / "empty"
    empty.mkdir()
    hf.export(str(run), str(empty))  # an empty directory is filled
    assert "model.safetensors" in os.listdir(empty)
    with pytest.raises(ValueError, match="--scope 'value' is not one of policy, reward_model"):
        hf.export(str(run), str(tmp_path / "other"), scope="value")
    with pytest.raises(ValueError, match="has no policy/hparams.json"):
        hf.export(str(tmp_path / "empty"), str(tmp_path / "other"))


def test_launch_export_command(saved_run, tmp_path):
    run, _ = saved_run
    env = dict(os.environ, LMHP_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "export", str(run), str(tmp_path / "o"),
                           "--scope", "reward_model"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "reward_head.safetensors" in os.listdir(tmp_path / "o")


# ----- in -----------------------------------------------------------------------------------------------------------

def checkpoint_values(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(checkpoint)}


def test_import_of_an_export_round_trips_to_identical_weights(saved_run, exported):
    _, values = saved_run
    for directory, scope in zip(exported, ("policy", "reward_model")):
        model = TrainedModel(directory)
        assert model.hparams() == HP and model.encoding.name == "test"
        ours = {name[len(scope) + 1:]: value for name, value in values.items() if name.startswith(scope + "/")}
        imported = checkpoint_values(model.checkpoint())
        assert sorted(imported) == sorted(ours)  # trunk, head and (reward model) the normalisation
        for name, value in ours.items():
            np.testing.assert_array_equal(imported[name], value, err_msg=name)
    # Loaded into a graph, under another scope: the same parameters.
    policy = Policy(TrainedModel(exported[0]), scope="new_policy")
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for var in policy.get_params():
            np.testing.assert_array_equal(sess.run(var), values["policy/" + var.op.name[len("new_policy/"):]])


def test_an_exported_reward_model_is_a_reward_model_again(saved_run, exported):
    run, _ = saved_run
    queries, responses = np.array([[1, 2, 3]], np.int32), np.array([[4, 5, PAD, PAD]], np.int32)
    rewards = []
    for source in (str(run / "reward_model"), exported[1]):
        with tf.Graph().as_default():
            reward_model = RewardModel(TrainedModel("reward_model", savedir=source, scope="reward_model"))
            op = reward_model.get_rewards_op(tf.constant(queries), tf.constant(responses))
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                rewards.append(sess.run(op))
    np.testing.assert_array_equal(rewards[0], rewards[1])


def test_hf_names_with_prefix_tied_head_and_mask_buffers_are_accepted(exported, tmp_path):
    config, tensors = read_export(exported[0])
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(config, activation_function="gelu_pytorch_tanh")))
    (directory / "encoding").write_text('"test"')
    renamed = {f"transformer.{name}": value for name, value in tensors.items()}
    renamed["lm_head.weight"] = tensors["wte.weight"]
    renamed["transformer.h.0.attn.bias"] = np.tril(np.ones([1, 1, 8, 8], np.float32))
    renamed["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(renamed, str(directory / "model.safetensors"))
    imported = checkpoint_values(TrainedModel(str(directory)).checkpoint())
    np.testing.assert_array_equal(imported["model/h0/attn/c_attn/w"], tensors["h.0.attn.c_attn.weight"][None])
    np.testing.assert_array_equal(imported["model/wte"], tensors["wte.weight"])


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("h.1.mlp.c_fc.bias"), "no tensor h.1.mlp.c_fc.bias"),
    (lambda t: t.update({"wpe.weight": np.zeros([9, 8], np.float32)}),
     r"wpe.weight has shape \[9, 8\], but config.json.s sizes give \[8, 8\]"),
    (lambda t: t.update({"lm_head.weight": t["wte.weight"] + 1}), "lm_head.weight differs from wte.weight"),
])
def test_bad_weights_are_refused_naming_the_tensor(exported, tmp_path, change, message):
    config, tensors = read_export(exported[0])
    change(tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "encoding").write_text('"test"')
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        TrainedModel(str(tmp_path)).checkpoint()


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    """A bfloat16 safetensors file written byte by byte (numpy has no bfloat16): its values are the high halves of
    float32s."""
    exact = np.array([[1.0, -2.5], [0.15625, -65536.0]], np.float32)  # bfloat16 holds these exactly
    raw = (exact.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(raw)]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "w.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    np.testing.assert_array_equal(hf._read_safetensors(str(tmp_path / "w.safetensors"))["w"], exact)


@pytest.mark.parametrize("field, value", [
    ("model_type", "gpt_neox"), ("activation_function", "relu"), ("tie_word_embeddings", False),
    ("layer_norm_epsilon", 1e-6), ("n_inner", 7), ("scale_attn_by_inverse_layer_idx", True),
    ("scale_attn_weights", False), ("n_head", 0), ("vocab_size", None),
])
def test_a_config_that_is_not_gpt2_is_refused_naming_the_field(exported, tmp_path, field, value):
    config, _ = read_export(exported[0])
    config[field] = value
    if value is None:
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "encoding").write_text('"test"')
    with pytest.raises(ValueError, match=rf"config.json: {field}=.* is not supported; expected"):
        TrainedModel(str(tmp_path)).hparams()


def test_hub_names_are_fetched_with_snapshot_download(exported, monkeypatch):
    import huggingface_hub
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return exported[0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = TrainedModel("hf:someone/tiny-policy@v2")
    assert model.savedir == exported[0] and model.hparams() == HP
    assert calls[0][0] == "someone/tiny-policy" and calls[0][1]["revision"] == "v2"
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(calls[0][1]["allow_patterns"])
    TrainedModel("hf:gpt2")  # a repository without an owner, as the oldest ones are
    assert calls[-1][0] == "gpt2" and calls[-1][1]["revision"] is None
    for bad in ("hf:", "hf:a/b/c", "hf:me/x@", "hf:me/x y"):
        with pytest.raises(ValueError, match="is not a Hugging Face model name: expected hf:OWNER/NAME"):
            TrainedModel(bad)


def test_offline_a_hub_model_not_in_the_cache_fails_at_once_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), LMHP_CACHE_DIR=str(tmp_path / "c"))
    env.pop("HF_HUB_CACHE", None)
    code = ("from lm_human_preferences.language.trained_models import TrainedModel\n"
            "try:\n    TrainedModel('hf:nobody/nothing@main')\nexcept ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("hf:nobody/nothing@main: nobody/nothing is not in the Hugging Face cache")
    assert "$HF_HUB_OFFLINE is set" in lines[0] and "`hf download nobody/nothing --revision main`" in lines[0]


# ----- the encoding -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_shaped_export(tmp_path_factory):
    """A 1-layer model with GPT-2's vocabulary (the `main` encoding), saved as a run's policy and exported."""
    run = tmp_path_factory.mktemp("main_run")
    hp = lm_model.HParams(n_vocab=50257, n_ctx=4, n_embd=4, n_head=1, n_layer=1)
    with tf.Graph().as_default():
        policy = Policy(TrainedModel.random("tiny-main", hp, "main"), scope="policy")
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            save_model(sess, tf.train.Saver(policy.get_params()), str(run / "policy"), hp, "main", step=1)
    return hf.export(str(run), str(run / "export"))


def test_a_main_encoding_export_carries_gpt2s_tokenizer(gpt2_shaped_export):
    gpt2 = encodings._find_encoder_dir(None)
    with open(os.path.join(gpt2_shaped_export, "vocab.json")) as ours, open(os.path.join(gpt2, "encoder.json")) as f:
        assert json.load(ours) == json.load(f)
    with open(os.path.join(gpt2_shaped_export, "merges.txt")) as ours, open(os.path.join(gpt2, "vocab.bpe")) as f:
        assert ours.read() == f.read()
    with open(os.path.join(gpt2_shaped_export, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (50256, 50256, 50257)
    with open(os.path.join(gpt2_shaped_export, "tokenizer_config.json")) as f:
        assert json.load(f)["eos_token"] == "<|endoftext|>"


def test_gpt2s_tokenizer_files_give_the_main_encoding_and_others_are_refused(gpt2_shaped_export, tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):  # no `encoding` file
        shutil.copyfile(os.path.join(gpt2_shaped_export, name), directory / name)
    model = TrainedModel(str(directory))
    assert model.encoding.name == "main" and model.encoding.get_encoder().encode("Hello world") == [15496, 995]
    merges = (directory / "merges.txt").read_text().split("\n")
    (directory / "merges.txt").write_text("\n".join([merges[0], merges[2], merges[1], *merges[3:]]))
    with pytest.raises(ValueError, match="merges.txt is not GPT-2's: only GPT-2's byte-level BPE"):
        TrainedModel(str(directory))
    os.remove(directory / "merges.txt")
    with pytest.raises(ValueError, match="has vocab.json but no merges.txt"):
        TrainedModel(str(directory))
    os.remove(directory / "vocab.json")
    assert TrainedModel(str(directory)).encoding.name == "main"  # GPT-2's vocabulary size, no tokenizer files


def test_preflight_takes_hugging_face_directories_and_wants_a_reward_head_for_a_reward_model(exported, tmp_path):
    from lm_human_preferences import preflight
    for network in (False, True):
        assert preflight.load_model("task.policy.initial_model", exported[0], saved_reward_model=False,
                                    network=network).hparams() == HP
        assert preflight.load_model("rewards.trained_model", exported[1], saved_reward_model=True,
                                    network=network).is_huggingface
    with pytest.raises(ValueError, match=r"rewards.trained_model .*: .* has no reward_head.safetensors: a Hugging "
                                         r"Face model is a reward model only as `./launch.py export"):
        preflight.load_model("rewards.trained_model", exported[0], saved_reward_model=True, network=True)
    (tmp_path / "config.json").write_text(json.dumps(read_export(exported[0])[0]))
    (tmp_path / "encoding").write_text('"test"')
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        preflight.load_model("task.policy.initial_model", str(tmp_path), saved_reward_model=False, network=True)


def test_sharded_weights_are_read_through_their_index(exported, tmp_path):
    config, tensors = read_export(exported[0])
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for filename, shard in shards.items():
        save_file({name: tensors[name] for name in shard}, str(tmp_path / filename))
    weight_map = {name: filename for filename, shard in shards.items() for name in shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "encoding").write_text('"test"')
    imported = checkpoint_values(TrainedModel(str(tmp_path)).checkpoint())
    whole = checkpoint_values(TrainedModel(exported[0]).checkpoint())
    assert sorted(imported) == sorted(name for name in whole if "/heads/" not in name)
    for name, value in imported.items():
        np.testing.assert_array_equal(value, whole[name], err_msg=name)
