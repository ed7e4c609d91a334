"""Reward-model training from human preference labels (SPEC section 7): `./launch.py train_reward`."""

from dataclasses import dataclass, field
from typing import Optional

from lm_human_preferences import lm_tasks
from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.hyperparams import require


@dataclass
class RunHParams(hyperparams.HParams):
    seed: Optional[int] = None  # random seed of the run; each MPI rank adds its rank offset
    log_interval: int = 10  # log statistics (and PPO samples) every this many updates
    save_interval: int = 50  # write a checkpoint every this many updates (and always at the end)
    save_dir: Optional[str] = None  # where the run is saved: SAVE_DIR/NAME from the command line


@dataclass
class LabelHParams(hyperparams.HParams):
    type: str = None  # label type: best_of_N (e.g. best_of_4), scalar_rating or scalar_compare
    num_train: int = None  # labels used for training (one pass), taken from the start of the shuffled file
    source: Optional[str] = None  # label file: local path, https:// or gs:// URL (released JSON format)
    num_valid: int = 0  # labels held out after the training ones to report validation loss/accuracy (0 in 2019)
    judge: Optional[str] = None  # offline demo: without `source`, label samples of the initial policy with this synthetic judge
    judge_temperature: float = 0.0  # noise of the synthetic judge: softmax temperature over its scores (0 = always its best)

    def check(self, prefix):
        require(self.source is not None or self.judge is not None,
                f"{prefix}source is required (a label file: path, https:// or gs:// URL); "
                f"or set {prefix}judge to label with a synthetic judge (offline demo)")
        require(self.num_train > 0, f"{prefix}num_train must be positive, got {self.num_train}")
        require(self.num_valid >= 0, f"{prefix}num_valid must be >= 0, got {self.num_valid}")
        require(self.judge_temperature >= 0, f"{prefix}judge_temperature must be >= 0, got {self.judge_temperature}")


@dataclass
class HParams(hyperparams.HParams):
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
        require(self.rollout_batch_size > 0,
                f"{prefix}rollout_batch_size must be positive, got {self.rollout_batch_size}")
        require(self.normalize_samples >= 0, f"{prefix}normalize_samples must be >= 0")
        if self.normalize_before or self.normalize_after:
            require(self.normalize_samples > 0,
                    f"{prefix}normalize_before/normalize_after need {prefix}normalize_samples > 0")


def train(hparams: HParams):
    raise NotImplementedError("reward training lands with issue 4")
