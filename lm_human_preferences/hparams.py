"""Every hyperparameter of `train_reward` and `train_policy`, and GPT-2's shape, as typed dataclasses.

This module imports no TensorFlow, so that resolving, validating and printing a run's hyperparameters
(`./launch.py ... --dry_run`, the launcher's checks before any rank starts) loads none. The modules that use a
group re-export it under its old name: `train_reward.HParams` is `TrainRewardHParams`, `train_policy.HParams`
is `TrainPolicyHParams`, `ppo.PpoHParams`, `online_labels.OnlineLabelHParams`, `language.model.HParams` is
`ModelHParams`. The task's group (`task`, `task.policy`) lives in lm_tasks.py, which needs no TensorFlow either.

The tree, as the command line names it (`--run.seed 1`, `--rewards.train_new_model.labels.num_train 4992`):

    train_reward: run, task, labels, batch_size, lr, rollout_batch_size, normalize_*, debug_normalize
    train_policy: run, task, rewards (kl_coef, adaptive_kl, trained_model, train_new_model = a train_reward
                  tree), ppo, labels (online)

Each field's 2019 default and meaning are in docs/algorithms.md.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from lm_human_preferences import label_types, labeler, lm_tasks
from lm_human_preferences.utils import hyperparams, mpi
from lm_human_preferences.utils.hyperparams import require

# ----- GPT-2's shape (a checkpoint's hparams.json) --------------------------------------------------------------

LAYER_NORM_EPSILON = 1e-5  # GPT-2's layer norm; fixed by the architecture, not recorded in hparams.json


@dataclass
class ModelHParams(hyperparams.HParams):
    """GPT-2 shape, as in a checkpoint's `hparams.json` (defaults: the 124M model)."""
    n_vocab: int = 50257  # tokens the output layer scores (the padding token is not one of them)
    n_ctx: int = 1024  # position embeddings: the most real tokens one sequence may hold
    n_embd: int = 768  # width of the residual stream
    n_head: int = 12  # attention heads per layer (n_embd must be a multiple)
    n_layer: int = 12  # transformer blocks
    embd_pdrop: float = 0.1  # dropout on the input embeddings (only with do_dropout; 2019 ran without)
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    resid_pdrop: float = 0.1  # dropout on each block's attention and mlp outputs
    head_pdrop: float = 0.1  # dropout on the hidden state read by scalar heads

    def check(self, prefix: str):
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):
            require(getattr(self, name) > 0, f"{prefix}{name} must be positive, got {getattr(self, name)}")
        require(self.n_embd % self.n_head == 0,
                f"{prefix}n_embd={self.n_embd} must be a multiple of {prefix}n_head={self.n_head}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "head_pdrop"):
            require(0 <= getattr(self, name) < 1, f"{prefix}{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_json_dict(cls, data, *, where: str) -> "ModelHParams":
        """From a GPT-2 / saved-run `hparams.json`; keys we don't use are tolerated, `where` names the file."""
        required = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
        missing = [key for key in required if key not in data] if isinstance(data, dict) else required
        if missing:
            raise hyperparams.HParamError(f"{where}: missing {', '.join(missing)}; a GPT-2 hparams.json is a JSON "
                                          f"object with the integers {', '.join(required)}")
        return cls.from_nested_dict(data, strict=False, where=f"{where}: ").validate(f"{where}: ")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# ----- what both trainers share -----------------------------------------------------------------------------------

@dataclass
class RunHParams(hyperparams.HParams):
    seed: Optional[int] = None  # random seed of the run; each MPI rank adds its rank offset
    log_interval: int = 10  # log statistics (and PPO samples) every this many updates
    save_interval: int = 50  # write a checkpoint every this many updates (and always at the end)
    save_dir: Optional[str] = None  # where the run is saved: SAVE_DIR/NAME from the command line
    judge: Optional[str] = None  # a synthetic judge whose true score of each rollout is logged as objective/judge
    xla: bool = False  # compile with XLA auto-clustering (see the README's Performance section)
    mixed_precision: bool = False  # compute the transformers in bfloat16 (float32 weights); a GPU speed switch
    tf32: bool = False  # let float32 matrix products use TF32 on Ampere+ GPUs (off: true float32, as in 2019)

    def check(self, prefix):
        require(self.save_dir is None or "://" not in self.save_dir or self.save_dir.startswith("gs://"),
                f"{prefix}save_dir={self.save_dir!r}: a run is saved to a local directory or a gs:// URL; "
                "https:// locations are read-only")


# ----- train_reward -------------------------------------------------------------------------------------------------

@dataclass
class LabelHParams(hyperparams.HParams):
    type: str = None  # label type: best_of_N (e.g. best_of_4), scalar_rating or scalar_compare
    num_train: int = None  # labels used for training (one pass), taken from the start of the shuffled file
    source: Optional[str] = None  # label file: local path, https:// or gs:// URL (released JSON format)
    num_valid: int = 0  # labels held out after the training ones to report validation loss/accuracy (0 in 2019)
    judge: Optional[str] = None  # without `source`: label initial-policy samples with this synthetic judge (demo)
    judge_temperature: float = 0.0  # judge's noise: softmax temperature (best_of_N), noise std (scalar labels)

    def check(self, prefix):
        require(self.source is not None or self.judge is not None,
                f"{prefix}source is required (a label file: path, https:// or gs:// URL); "
                f"or set {prefix}judge to label with a synthetic judge (offline demo)")
        require(self.num_train > 0, f"{prefix}num_train must be positive, got {self.num_train}")
        require(self.num_valid >= 0, f"{prefix}num_valid must be >= 0, got {self.num_valid}")
        require(self.judge_temperature >= 0, f"{prefix}judge_temperature must be >= 0, got {self.judge_temperature}")


@dataclass
class TrainRewardHParams(hyperparams.HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    labels: LabelHParams = field(default_factory=LabelHParams)
    batch_size: int = 40  # labels per optimizer step, all ranks together
    lr: float = 5e-5  # Adam learning rate at the start; decays linearly to 0 over the pass
    rollout_batch_size: int = 64  # policy samples per batch when estimating the reward scale (all ranks)
    normalize_samples: int = 0  # policy samples used to estimate the reward mean and std
    debug_normalize: int = 0  # fresh policy samples used to report the reward mean/std after normalising
    normalize_before: bool = False  # set gain/bias before training so rewards match the labels' target scale
    normalize_after: bool = False  # reset gain/bias after training to mean 0, std 1 (keeps kl_coef meaningful)

    def check(self, prefix):
        require(self.batch_size > 0, f"{prefix}batch_size must be positive, got {self.batch_size}")
        require(self.lr >= 0, f"{prefix}lr must be >= 0, got {self.lr}")
        require(self.labels.num_train % self.batch_size == 0,
                f"{prefix}labels.num_train={self.labels.num_train} must be a multiple of "
                f"{prefix}batch_size={self.batch_size} (one pass over the labels in whole batches)")
        require(self.rollout_batch_size > 0,
                f"{prefix}rollout_batch_size must be positive, got {self.rollout_batch_size}")
        require(self.normalize_samples >= 0, f"{prefix}normalize_samples must be >= 0")
        if self.normalize_before or self.normalize_after:
            require(self.normalize_samples > 0,
                    f"{prefix}normalize_before/normalize_after need {prefix}normalize_samples > 0")


# ----- PPO ----------------------------------------------------------------------------------------------------------

@dataclass
class PpoHParams(hyperparams.HParams):
    total_episodes: int = 2_000_000  # episodes (query + response) over the whole run, all ranks
    batch_size: int = 64  # episodes per PPO update, all ranks together
    nminibatches: int = 1  # minibatches (Adam steps) per epoch over the batch
    noptepochs: int = 4  # passes over each batch
    lr: float = 5e-6  # Adam learning rate at the start; annealed linearly to 0 over all updates
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    cliprange: float = 0.2  # policy ratio clip: ratio in [1 - c, 1 + c]
    cliprange_value: float = 0.2  # value clip: new values within old values ± c (reward units)
    gamma: float = 1.0  # discount per response token
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = True  # rescale per-token rewards to unit variance per minibatch (mean kept)
    micro_batches: int = 1  # split each minibatch into this many micro-batches whose gradients are summed
    #                         before one Adam step: the same update with less memory (new; 2019 had none)

    def check(self, prefix):
        for name in ("total_episodes", "batch_size", "nminibatches", "noptepochs", "micro_batches"):
            require(getattr(self, name) > 0, f"{prefix}{name} must be positive, got {getattr(self, name)}")
        require(self.lr >= 0, f"{prefix}lr must be >= 0, got {self.lr}")
        require(self.vf_coef >= 0, f"{prefix}vf_coef must be >= 0, got {self.vf_coef}")
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, f"{prefix}{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value"):
            require(getattr(self, name) > 0, f"{prefix}{name} must be positive, got {getattr(self, name)}")


@dataclass
class AdaptiveKLParams(hyperparams.HParams):
    target: float = None  # the KL to the reference policy (nats per response) that kl_coef steers toward
    horizon: int = 10000  # episodes over which a proportional error of 1 would change kl_coef e-fold

    def check(self, prefix):
        require(self.target > 0, f"{prefix}target must be positive (nats), got {self.target}")
        require(self.horizon > 0, f"{prefix}horizon must be positive (episodes), got {self.horizon}")


# Whitening rewards over fewer episodes than this is meaningless (2019 refused it too).
MIN_WHITENED_MINIBATCH = 8


@dataclass
class BatchSizes:
    """How one PPO update's episodes split over ranks, minibatches and micro-batches, and the run's length."""
    per_rank: int  # episodes per update on each rank
    minibatch: int  # episodes per Adam step on each rank
    micro_batch: int  # episodes per forward/backward pass on each rank
    num_updates: int  # PPO updates of the run: ceil(total_episodes / batch_size), as in 2019


def batch_sizes(ppo_hp: PpoHParams, ranks: int) -> BatchSizes:
    """The sizes of `ppo_hp` on `ranks` ranks, or a ValueError naming the hyperparameters that do not fit.
    Cheap and free of side effects: the launcher and `train_policy.train` call it before anything is trained."""
    per_rank = mpi.exact_div(ppo_hp.batch_size, ranks, "ppo.batch_size")
    minibatch = mpi.exact_div(per_rank, ppo_hp.nminibatches, f"the per-rank batch (ppo.batch_size / {ranks} ranks)",
                              parts_what="ppo.nminibatches")
    micro_batch = mpi.exact_div(minibatch, ppo_hp.micro_batches,
                                "the per-rank minibatch (ppo.batch_size / ranks / ppo.nminibatches)",
                                parts_what="ppo.micro_batches")
    if ppo_hp.whiten_rewards and minibatch < MIN_WHITENED_MINIBATCH:
        raise ValueError(f"ppo.whiten_rewards whitens each per-rank minibatch, which holds only {minibatch} episodes "
                         f"(ppo.batch_size={ppo_hp.batch_size} / {ranks} ranks / ppo.nminibatches="
                         f"{ppo_hp.nminibatches}); at least {MIN_WHITENED_MINIBATCH} are needed: raise ppo.batch_size, "
                         f"lower ppo.nminibatches or the number of ranks, or set --ppo.whiten_rewards false")
    return BatchSizes(per_rank, minibatch, micro_batch, num_updates=math.ceil(ppo_hp.total_episodes / ppo_hp.batch_size))


# ----- labels collected during PPO (online_labels.py) ---------------------------------------------------------------

@dataclass
class OnlineLabelHParams(hyperparams.HParams):
    initial_labels: int = None  # N0: labels of initial-policy samples collected before PPO starts
    total_labels: int = None  # N: labels l(n) reaches at the last PPO episode (the schedule in online_labels.py)
    episodes_between_rounds: int = None  # PPO episodes between retrainings (paper: 100,000 of 2M episodes)
    judge: str = None  # who labels: `human` (PPO pauses, the web app serves the round) or a synthetic judge
    judge_temperature: float = 0.0  # a synthetic judge's noise (labeler.py); `human` ignores it
    type: Optional[str] = None  # label type of the online labels; none: rewards.train_new_model.labels.type
    host: str = "127.0.0.1"  # human: address the labeling web app serves on (off loopback it needs a token)
    port: int = 8000  # human: the web app's port (0: any free port)
    token: Optional[str] = None  # human: the token every request must carry; none: made when serving off loopback
    overlap: float = 0.0  # human: fraction of items answered by two labelers, to measure their agreement
    instructions: Optional[str] = None  # human: a text file of task instructions shown to labelers

    def check(self, prefix):
        require(self.initial_labels > 0, f"{prefix}initial_labels must be positive, got {self.initial_labels}")
        require(self.total_labels > self.initial_labels,
                f"{prefix}total_labels={self.total_labels} must exceed {prefix}initial_labels={self.initial_labels}: "
                f"the difference is what is collected during PPO (equal counts are the offline case: "
                f"--{prefix[:-1]} off)")
        require(self.episodes_between_rounds > 0,
                f"{prefix}episodes_between_rounds must be positive, got {self.episodes_between_rounds}")
        require(self.judge_temperature >= 0, f"{prefix}judge_temperature must be >= 0, got {self.judge_temperature}")
        if self.judge != labeler.HUMAN:
            try:
                labeler.get_judge(self.judge)
            except ValueError as error:
                raise hyperparams.HParamError(f"{prefix}judge: {error}; or `human` (people, in the labeling web "
                                              f"app)") from None
        if self.type is not None:
            try:
                label_types.get(self.type)
            except ValueError as error:
                raise hyperparams.HParamError(f"{prefix}type: {error}") from None
        require(0.0 <= self.overlap <= 1.0, f"{prefix}overlap must be a fraction in [0, 1], got {self.overlap}")
        require(0 <= self.port <= 65535,
                f"{prefix}port must be a TCP port 0..65535 (0: any free port), got {self.port}")

    def label_type_name(self, reward_hparams) -> str:
        return self.type or reward_hparams.labels.type


def check_online(online: OnlineLabelHParams, rewards_hparams, ppo_hparams, prefix: str = "labels.online."):
    """The rules that tie `labels.online` to the rest of a train_policy run (TrainPolicyHParams.check calls it)."""
    reward = rewards_hparams.train_new_model
    require(reward is not None,
            f"{prefix[:-1]} retrains the reward model with the recipe of rewards.train_new_model (batch_size, lr, "
            f"normalisation) and restarts it from the initial model each round: switch rewards.train_new_model on "
            f"(and leave rewards.trained_model unset)")
    for name in ("initial_labels", "total_labels"):
        count = getattr(online, name)
        require(count % reward.batch_size == 0,
                f"{prefix}{name}={count} must be a multiple of rewards.train_new_model.batch_size="
                f"{reward.batch_size} (each retraining is one pass over the labels in whole batches)")
    require(online.episodes_between_rounds >= ppo_hparams.batch_size,
            f"{prefix}episodes_between_rounds={online.episodes_between_rounds} must be at least ppo.batch_size="
            f"{ppo_hparams.batch_size} (rounds come between PPO updates, at most one per update)")
    require(online.episodes_between_rounds < ppo_hparams.total_episodes,
            f"{prefix}episodes_between_rounds={online.episodes_between_rounds} leaves no round within "
            f"ppo.total_episodes={ppo_hparams.total_episodes}; make it smaller")


# ----- train_policy -------------------------------------------------------------------------------------------------

@dataclass
class RewardHParams(hyperparams.HParams):
    kl_coef: float = 0.2  # weight of the per-token KL penalty to the reference policy (nats -> reward)
    adaptive_kl: Optional[AdaptiveKLParams] = None  # on: steer kl_coef so the KL approaches a target
    trained_model: Optional[str] = None  # a saved reward model: SAVE_DIR/reward_model (local, https, gs)
    train_new_model: Optional[TrainRewardHParams] = None  # on: train a reward model first (its hparams)

    def check(self, prefix):
        require((self.trained_model is None) != (self.train_new_model is None),
                f"set exactly one of {prefix}trained_model and {prefix}train_new_model "
                f"(to use a saved reward model: --{prefix}train_new_model off --{prefix}trained_model PATH)")


@dataclass
class PolicyLabelHParams(hyperparams.HParams):
    """Labels a policy run collects itself (a reward model trained first takes its own from rewards.train_new_model)."""
    online: Optional[OnlineLabelHParams] = None  # on: label current-policy samples during PPO (paper 2.3)


@dataclass
class TrainPolicyHParams(hyperparams.HParams):
    run: RunHParams = field(default_factory=RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    rewards: RewardHParams = field(default_factory=RewardHParams)
    ppo: PpoHParams = field(default_factory=PpoHParams)
    labels: PolicyLabelHParams = field(default_factory=PolicyLabelHParams)

    def place_reward_model(self) -> "TrainPolicyHParams":
        """Set where the reward model trained first is saved: in this run's own directory, as SAVE_DIR/reward_model,
        so its `run.save_dir` is this run's (as 2019 recorded it). experiments.resolve_trials calls this once
        run.save_dir is known, so that --dry_run shows the value the run uses."""
        if self.rewards.train_new_model is not None and self.rewards.train_new_model.run.save_dir is None:
            self.rewards.train_new_model.run.save_dir = self.run.save_dir
        return self

    def check(self, prefix):
        if self.labels.online is not None:
            check_online(self.labels.online, self.rewards, self.ppo, f"{prefix}labels.online.")
        reward_hparams = self.rewards.train_new_model
        if reward_hparams is not None:
            require(reward_hparams.run.save_dir in (None, self.run.save_dir),
                    f"{prefix}rewards.train_new_model.run.save_dir={reward_hparams.run.save_dir!r}: the reward model "
                    f"a policy run trains first is saved in the run's own directory, as SAVE_DIR/reward_model "
                    f"({prefix}run.save_dir={self.run.save_dir!r}); choose the directory with --save_dir (or "
                    f"--{prefix}run.save_dir), and leave {prefix}rewards.train_new_model.run.save_dir unset")
            ours = hyperparams.flatten(self.task.to_nested_dict())
            theirs = hyperparams.flatten(reward_hparams.task.to_nested_dict())
            differing = [f"task.{name}" for name in ours if ours[name] != theirs.get(name)]
            require(not differing,
                    f"the policy's task and the new reward model's task differ in {', '.join(differing)}; "
                    f"set both --task.X and --rewards.train_new_model.task.X")
