"""The policy: GPT-2 with a `value` head on the same trunk.

Variables: `SCOPE/model/...` (GPT-2 names) and `SCOPE/model/heads/value/{w,b}`. They are created when the
policy is built and take the trained model's weights from the global variables initialiser (the value head,
absent from GPT-2 checkpoints, starts at zero).

Trainers use the graph builders `respond_op` / `analyze_responses_op`; tools and tests use the numpy
conveniences `respond` / `analyze_responses`, which run in the default session. `sampler` is the set-up of
everything that samples a task's responses: the trainers, the labeler, the demo and sample.py.
"""

from typing import Callable, Dict

import numpy as np
import tensorflow.compat.v1 as tf

from lm_human_preferences import lm_tasks
from lm_human_preferences.language import sample
from lm_human_preferences.language.model import Model, shape_list


def _identity(queries):
    return queries


class Policy:
    def __init__(self, trained_model, *, scope: str, temperature=1.0, embed_queries: Callable = _identity,
                 compute_dtype=tf.float32):
        """trained_model: a TrainedModel; embed_queries maps queries [b, query_length] to the model's context
        [b, context_length] (the task adds its prefix and suffix tokens there); compute_dtype: tf.bfloat16
        for mixed precision (float32 variables, log-probs and values; see language/model.py). temperature > 0:
        checked where it enters, as task.policy.temperature (lm_tasks.py) or sample.py's --temperature."""
        self.trained_model = trained_model
        self.model_hparams = trained_model.hparams()
        self.encoding = trained_model.encoding
        self.padding_token = self.encoding.padding_token
        self.temperature = temperature
        self.embed_queries = embed_queries
        self.graph = tf.get_default_graph()
        with tf.variable_scope(scope) as variable_scope:
            self.scope = variable_scope.name
            # the value head starts at zero, so that early value estimates do not disturb PPO
            self.model = Model(self.model_hparams, scalar_heads={"value": tf.zeros_initializer()}, scope="model",
                               compute_dtype=compute_dtype)
        # Build once, outside any loop, so that every variable exists; then route the checkpoint's weights.
        with tf.name_scope(f"{self.scope}_build"):
            self.model(tf.zeros([1, 1], tf.int32), padding_token=self.padding_token)
        trained_model.init_op(self.get_params(), new_scope=self.scope)
        self._numpy_ops: Dict[tuple, tuple] = {}

    def get_params(self):
        """The trainable variables: the transformer and its value head."""
        return tf.trainable_variables(self.scope + "/")

    # ----- graph builders --------------------------------------------------------------------------------------
    def respond_op(self, queries, length, seed=None):
        """Sample `length` tokens after each query [b, query_length] at the policy's temperature.
        Returns responses [b, length] (int32), logprobs [b, length] and values [b, length]. `seed`: see
        `sample.sample_sequence` (an int tensor [2] makes the sample a function of the seed alone)."""
        result = sample.sample_sequence(self.model, length=length, context=self.embed_queries(queries),
                                        temperature=self.temperature, padding_token=self.padding_token,
                                        extra_outputs={"values": "value"}, seed=seed)
        return {"responses": result["tokens"], "logprobs": result["logprobs"], "values": result["values"]}

    def analyze_responses_op(self, queries, responses):
        """Score given responses [b, R] after queries [b, query_length] in one forward pass.

        Returns logprobs (of each response token given the context and the response before it, at the
        policy's temperature), entropies of those distributions and values at the same positions, each [b, R].
        """
        responses = tf.convert_to_tensor(responses, dtype=tf.int32)
        response_length = shape_list(responses)[1]
        # The last response token predicts nothing we score, so it is not fed; the logits that predict the
        # R response tokens are those of the last R positions.
        tokens = tf.concat([self.embed_queries(queries), responses[:, :-1]], axis=1)  # [b, context + R - 1]
        output = self.model(tokens, padding_token=self.padding_token, logits_for_last=response_length)
        logp, entropies = sample.log_softmax_and_entropy(output["lm_logits"] / self.temperature)  # [b, R, V]
        return {"logprobs": sample.logprobs_of(logp, responses), "entropies": entropies,
                "values": output["value"][:, -response_length:]}

    # ----- numpy conveniences (default session) --------------------------------------------------------------
    def _run(self, key, build, feeds):
        """Run the op built by `build(*placeholders)` for this `key` of static shapes; built once per key."""
        session = tf.get_default_session()
        if session is None:
            raise ValueError("Policy.respond / analyze_responses run in the default session: call them inside "
                             "`with session.as_default():` (after running the global variables initializer)")
        if key not in self._numpy_ops:
            with self.graph.as_default(), tf.name_scope(f"{self.scope}_numpy"):
                placeholders = [tf.placeholder(tf.int32, [None, value.shape[1]]) for value in feeds]
                self._numpy_ops[key] = (placeholders, build(*placeholders))
        placeholders, op = self._numpy_ops[key]
        return session.run(op, dict(zip(placeholders, feeds)))

    def respond(self, queries, length: int):
        """queries: int32 [b, query_length] -> {responses, logprobs, values} as numpy arrays [b, length]."""
        queries = _int_matrix(queries, "queries")
        return self._run(("respond", queries.shape[1], length), lambda q: self.respond_op(q, length), [queries])

    def analyze_responses(self, queries, responses):
        """queries [b, query_length], responses [b, R] -> {logprobs, entropies, values} as numpy arrays [b, R]."""
        queries, responses = _int_matrix(queries, "queries"), _int_matrix(responses, "responses")
        if len(queries) != len(responses):
            raise ValueError(f"analyze_responses: {len(queries)} queries but {len(responses)} responses")
        return self._run(("analyze", queries.shape[1], responses.shape[1]), self.analyze_responses_op,
                         [queries, responses])


def sampler(model, task: lm_tasks.TaskHParams, encoder=None, *, scope: str = None,
            seeded: bool = False, compute_dtype=tf.float32):
    """Sampling the task's responses: returns the policy, a queries placeholder [b, task.query_length], the seed
    placeholder [2] of a stateless sample (with `seeded`, as the trainers draw; else None: TensorFlow's stateful
    random numbers) and `respond_op`'s outputs for task.response_length tokens.

    model: a TrainedModel, built here as a Policy under `scope` at task.policy.temperature, its queries
    formatted by the task (with `encoder`); or a Policy built already (the reference policy that a PPO run's
    reward training shares, or the demo's, whose random ops keep their order)."""
    policy = model if isinstance(model, Policy) else Policy(
        model, scope=scope, temperature=task.policy.temperature,
        embed_queries=lm_tasks.query_formatter(task, encoder), compute_dtype=compute_dtype)
    queries = tf.placeholder(tf.int32, [None, task.query_length], name="queries")
    seed = tf.placeholder(tf.int64, [2], name="seed") if seeded else None
    return policy, queries, seed, policy.respond_op(queries, task.response_length, seed=seed)


def _int_matrix(array, what):
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: expected an integer array [batch, length], got {array.dtype} {array.shape}")
    return array.astype(np.int32)
