"""PPO fine-tuning of a policy against a reward model (SPEC section 8): `./launch.py train_policy`."""

from dataclasses import dataclass, field
from typing import Optional

from lm_human_preferences import lm_tasks, ppo, train_reward
from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.hyperparams import require


@dataclass
class RewardHParams(hyperparams.HParams):
    kl_coef: float = 0.2  # weight of the per-token KL penalty to the reference policy (nats -> reward)
    adaptive_kl: Optional[ppo.AdaptiveKLParams] = None  # on: steer kl_coef so the KL approaches a target
    trained_model: Optional[str] = None  # a saved reward model: SAVE_DIR/reward_model (local, https, gs)
    train_new_model: Optional[train_reward.HParams] = None  # on: train a reward model first (its hparams)

    def check(self, prefix):
        require((self.trained_model is None) != (self.train_new_model is None),
                f"set exactly one of {prefix}trained_model and {prefix}train_new_model "
                f"(to use a saved reward model: --{prefix}train_new_model off --{prefix}trained_model PATH)")


@dataclass
class HParams(hyperparams.HParams):
    run: train_reward.RunHParams = field(default_factory=train_reward.RunHParams)
    task: lm_tasks.TaskHParams = field(default_factory=lm_tasks.TaskHParams)
    rewards: RewardHParams = field(default_factory=RewardHParams)
    ppo: ppo.PpoHParams = field(default_factory=ppo.PpoHParams)

    def check(self, prefix):
        reward_hparams = self.rewards.train_new_model
        if reward_hparams is not None:
            ours = hyperparams.flatten(self.task.to_nested_dict())
            theirs = hyperparams.flatten(reward_hparams.task.to_nested_dict())
            differing = [f"task.{name}" for name in ours if ours[name] != theirs.get(name)]
            require(not differing,
                    f"the policy's task and the new reward model's task differ in {', '.join(differing)}; "
                    f"set both --task.X and --rewards.train_new_model.task.X")


def train(hparams: HParams):
    raise NotImplementedError("PPO training lands with issue 5")
