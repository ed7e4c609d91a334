"""TrainedModel: built-in models, GPT-2 and saved-run checkpoints loaded under our scopes, and their errors."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language import model as lm_model
from lm_human_preferences.language import trained_models
from lm_human_preferences.language.trained_models import TrainedModel
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils import files

# `test` encoding (27 symbols); n_embd 6 / 2 heads differs from the built-in `test` model on purpose.
HP = lm_model.HParams(n_vocab=27, n_ctx=8, n_embd=6, n_head=2, n_layer=2)


def random_values(variables, sess, seed=0):
    rng = np.random.RandomState(seed)
    for var in variables:
        var.load(rng.normal(size=var.shape.as_list()).astype(np.float32), sess)
    return {var.op.name: sess.run(var) for var in variables}


def write_gpt2_layout(directory, checkpoint_hparams=HP, hparams_json=HP):
    """A GPT-2 model directory: `model/...` variables, hparams.json, checkpoint state written elsewhere."""
    os.makedirs(directory, exist_ok=True)
    with tf.Graph().as_default():
        lm_model.Model(checkpoint_hparams, scope="model")(tf.zeros([1, 1], tf.int32))
        # Optimizer state that a checkpoint may carry; loading must ignore it.
        tf.get_variable("model/wte/Adam", [checkpoint_hparams.n_vocab, checkpoint_hparams.n_embd])
        tf.get_variable("beta1_power", [])
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            values = random_values(tf.global_variables(), sess)
            tf.train.Saver().save(sess, os.path.join(directory, "model.ckpt"), write_meta_graph=False,
                                  write_state=False)
    shape = {k: getattr(hparams_json, k) for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")}
    with open(os.path.join(directory, "hparams.json"), "w") as f:
        json.dump(shape, f)
    with open(os.path.join(directory, "encoding"), "w") as f:
        json.dump("test", f)  # GPT-2 directories have none (-> "main"); our tiny vocabulary needs `test`
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        # Written on the machine that trained: only the file name is meaningful here.
        f.write('model_checkpoint_path: "/somewhere/else/model.ckpt"\n'
                'all_model_checkpoint_paths: "/somewhere/else/model.ckpt"\n')
    return values


def load_policy_values(trained_model, scope):
    with tf.Graph().as_default():
        policy = Policy(trained_model, scope=scope)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return {var.op.name: sess.run(var) for var in policy.get_params()}


# ----- built-in models ------------------------------------------------------------------------------------------

def test_builtin_models():
    test = TrainedModel("test")
    hp = test.hparams()
    assert (hp.n_vocab, hp.n_ctx, hp.n_embd, hp.n_head, hp.n_layer) == (27, 8, 7, 1, 2)
    assert test.encoding.name == "test" and test.checkpoint() is None
    demo = TrainedModel("demo").hparams()
    assert (demo.n_vocab, demo.n_ctx, demo.n_embd, demo.n_head, demo.n_layer) == (27, 64, 32, 4, 2)


def test_random_models_start_every_scope_from_the_same_trunk():
    """Policy, reference policy and reward model from one random model start equal, as they do from GPT-2."""
    trained = TrainedModel("test")
    policy = Policy(trained, scope="policy")
    ref_policy = Policy(trained, scope="ref_policy")
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        ours = {v.op.name[len("policy/"):]: sess.run(v) for v in policy.get_params()}
        ref = {v.op.name[len("ref_policy/"):]: sess.run(v) for v in ref_policy.get_params()}
    assert ours.keys() == ref.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    assert np.std(ours["model/wte"]) == pytest.approx(0.02, rel=0.5)


def test_gpt2_names_resolve_to_the_gpt2_bucket():
    model = TrainedModel("124M")
    assert model.savedir == "https://openaipublic.blob.core.windows.net/gpt-2/models/124M"
    assert model.encoding.name == "main"


def test_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown model '125M': expected one of test, demo, 124M, 355M, 774M, 1558M"):
        TrainedModel("125M")


# ----- GPT-2 layout ---------------------------------------------------------------------------------------------

def test_gpt2_checkpoint_loads_under_the_policy_scope(tmp_path):
    directory = str(tmp_path / "tiny-gpt2")
    saved = write_gpt2_layout(directory)
    trained = TrainedModel(directory)
    assert trained.checkpoint() == os.path.join(directory, "model.ckpt")
    with pytest.warns(UserWarning, match=r"2 parameters are not in .*policy/model/heads/value/w"):
        loaded = load_policy_values(trained, scope="policy")
    checked = 0
    for name, value in loaded.items():
        if "/heads/value/" in name:
            assert np.all(value == 0)  # a fresh value head on top of the language model
            continue
        np.testing.assert_array_equal(value, saved[name[len("policy/"):]], err_msg=name)
        checked += 1
    assert checked == 4 + 12 * HP.n_layer  # wte, wpe, ln_f/{g,b} and 12 tensors per block


def test_shape_mismatch_names_the_variable_and_both_shapes(tmp_path):
    directory = str(tmp_path / "mismatch")
    bigger = lm_model.HParams(n_vocab=27, n_ctx=16, n_embd=6, n_head=2, n_layer=2)
    write_gpt2_layout(directory, checkpoint_hparams=bigger, hparams_json=HP)
    with pytest.raises(ValueError, match=r"model/wpe has shape \[16, 6\], but policy/model/wpe has shape \[8, 6\]"):
        Policy(TrainedModel(directory), scope="policy")


def test_remote_model_is_read_through_the_cache(tmp_path, monkeypatch):
    """A model at a URL: every file goes through files.local_path; here they are already in the cache."""
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    directory = str(tmp_path / "tiny-gpt2")
    saved = write_gpt2_layout(directory)
    url = "https://models.example.invalid/tiny-gpt2"
    for name in os.listdir(directory):
        target = files.cache_path(f"{url}/{name}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(os.path.join(directory, name), target)
    trained = TrainedModel(url)
    assert trained.encoding.name == "test" and trained.hparams().n_embd == 6
    with pytest.warns(UserWarning, match="heads/value"):
        loaded = load_policy_values(trained, scope="ref_policy")
    np.testing.assert_array_equal(loaded["ref_policy/model/h1/mlp/c_fc/w"], saved["model/h1/mlp/c_fc/w"])


def test_missing_checkpoint_and_bad_hparams(tmp_path):
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "hparams.json").write_text(json.dumps({"n_vocab": 27, "n_ctx": 8, "n_embd": 6, "n_head": 2}))
    (directory / "encoding").write_text('"test"')
    trained = TrainedModel(str(directory))
    with pytest.raises(ValueError, match=r"hparams.json: missing n_layer"):
        trained.hparams()
    with pytest.raises(ValueError, match=r"no TensorFlow checkpoint state file `checkpoint` in .*broken"):
        trained.checkpoint()
    (directory / "encoding").write_text('["test"]')
    with pytest.raises(ValueError, match=r"encoding: expected a JSON string"):
        TrainedModel(str(directory))


# ----- saved-run layout -----------------------------------------------------------------------------------------

def save_run_component(save_dir):
    """SAVE_DIR/policy as train_policy writes it, from a graph that also holds a ref_policy and Adam state."""
    model_dir = os.path.join(save_dir, "policy")
    trained = TrainedModel("test")
    with tf.Graph().as_default():
        policy = Policy(trained, scope="policy")
        Policy(trained, scope="ref_policy")
        loss = tf.reduce_sum(policy.analyze_responses_op(tf.constant([[1, 2]]), tf.constant([[3, 4]]))["values"])
        tf.train.AdamOptimizer(1e-3).minimize(loss, var_list=policy.get_params())
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            values = random_values(policy.get_params(), sess, seed=5)
            trained_models.write_model_files(model_dir, policy.model_hparams, "test")
            tf.train.Saver().save(sess, os.path.join(model_dir, "checkpoints", "model.ckpt"), global_step=5,
                                  write_meta_graph=False)
    return model_dir, values


def test_saved_run_component_loads_under_any_scope(tmp_path):
    model_dir, saved = save_run_component(str(tmp_path / "run"))
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "encoding", "hparams.json"]
    trained = TrainedModel("policy", savedir=model_dir, scope="policy")
    assert trained.checkpoint() == os.path.join(model_dir, "checkpoints", "model.ckpt-5")
    assert trained.encoding.name == "test" and trained.hparams().n_embd == 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_policy_values(trained, scope="ref_policy")
    assert not [w for w in caught if "not in" in str(w.message)]  # the value head is in the checkpoint too
    assert len(loaded) == len(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded["ref_" + name], value, err_msg=name)


def test_saved_run_scope_must_be_named_when_the_checkpoint_holds_several_models(tmp_path):
    model_dir, _ = save_run_component(str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"several models \(policy, ref_policy\); pass scope="):
        Policy(TrainedModel(model_dir), scope="policy")
