"""An exported policy loaded by Hugging Face `transformers` itself (GPT2LMHeadModel, AutoTokenizer), not only by the
numpy GPT-2 of test_hf.py: same token ids, same next-token log-probs, same values through the saved value head.

`transformers` needs torch, which the project does not depend on: this runs where a Python with both is given by
LMHP_TRANSFORMERS_PYTHON (e.g. a separate venv: `pip install torch transformers safetensors`), or where the project's
own Python has them, and is skipped otherwise, saying so.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from lm_human_preferences.language import hf
from lm_human_preferences.language import model as lm_model
from lm_human_preferences.language.trained_models import TrainedModel, save_model
from lm_human_preferences.policy import Policy

TEXT = "Hello world, this is a check of the export."

# Run by the Python that has transformers: prints the tokenizer's ids, the log-probs and the values as JSON.
TRANSFORMERS_SIDE = r"""
import json, sys
import numpy as np, torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel
export, text = sys.argv[1], sys.argv[2]
model = GPT2LMHeadModel.from_pretrained(export).eval()
ids = AutoTokenizer.from_pretrained(export)(text)["input_ids"]
with torch.no_grad():
    out = model(torch.tensor([ids]), output_hidden_states=True)
head = load_file(export + "/value_head.safetensors")
values = out.hidden_states[-1][0].numpy() @ head["weight"] + head["bias"]
print(json.dumps({"ids": ids, "logprobs": torch.log_softmax(out.logits[0], -1).tolist(),
                  "values": np.ravel(values).tolist()}))
"""


def transformers_python():
    python = os.environ.get("LMHP_TRANSFORMERS_PYTHON") or sys.executable
    probe = subprocess.run([python, "-c", "import torch, transformers"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no Python with torch and transformers ({python} lacks them; set LMHP_TRANSFORMERS_PYTHON to "
                    f"one that has them)")
    return python


def test_transformers_loads_an_export_and_gives_our_logprobs_and_values(tmp_path):
    python = transformers_python()
    hp = lm_model.HParams(n_vocab=50257, n_ctx=32, n_embd=64, n_head=4, n_layer=2)
    trained = TrainedModel.random("transformers-check", hp, "main")
    policy = Policy(trained, scope="policy")
    tokens = np.array([trained.encoding.get_encoder().encode(TEXT)], dtype=np.int32)
    outputs = policy.model(tf.constant(tokens))
    rng = np.random.RandomState(0)
    with tf.Session() as sess:
        sess.run(tf.global_variables_initializer())
        for variable in policy.get_params():  # away from the initialisation, so the distributions are sharp
            noise = np.asarray(rng.randn(*variable.shape.as_list()), dtype=np.float32) * 0.3
            sess.run(variable.assign_add(noise))
        save_model(sess, tf.train.Saver(policy.get_params()), str(tmp_path / "policy"), hp, "main", step=1)
        ours = sess.run({"logits": outputs["lm_logits"], "values": outputs["value"]})
    export = hf.export(str(tmp_path), str(tmp_path / "export"))

    result = subprocess.run([python, "-c", TRANSFORMERS_SIDE, export, TEXT], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.splitlines()[-1])
    assert theirs["ids"] == tokens[0].tolist()
    logits = ours["logits"][0].astype(np.float64)
    our_logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    assert np.ptp(our_logprobs, axis=-1).min() > 5  # not near-uniform: a wrong weight would show
    np.testing.assert_allclose(theirs["logprobs"], our_logprobs, atol=1e-4)
    np.testing.assert_allclose(theirs["values"], ours["values"][0], atol=1e-4)
