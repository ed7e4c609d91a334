"""Typed hyperparameters: parsing by declared type, nesting, on/off groups, JSON round trip, error messages."""

import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.hyperparams import HParamError, HParams, require


@dataclass
class Controller(HParams):
    target: float = None  # required when the group is on
    horizon: int = 10000


@dataclass
class Rewards(HParams):
    kl_coef: float = 0.2
    adaptive_kl: Optional[Controller] = None
    trained_model: Optional[str] = None


@dataclass
class Top(HParams):
    rewards: Rewards = field(default_factory=Rewards)
    seed: Optional[int] = None
    name: str = "x"
    whiten: bool = True
    steps: int = 3

    def check(self, prefix):
        require(self.steps > 0, f"{prefix}steps must be positive, got {self.steps}")


def test_strings_are_parsed_by_declared_type():
    hp = Top().override_from_dict({"rewards.kl_coef": "0.05", "seed": "7", "whiten": "off", "name": "13",
                                   "steps": "1e3"})
    assert hp.rewards.kl_coef == 0.05 and isinstance(hp.rewards.kl_coef, float)
    assert hp.seed == 7 and hp.whiten is False and hp.name == "13" and hp.steps == 1000
    # typed values (what `fire` hands over) are accepted as they are
    hp.override_from_dict({"seed": None, "steps": 2_000_000.0, "name": 13, "whiten": True})
    assert hp.seed is None and hp.steps == 2_000_000 and isinstance(hp.steps, int) and hp.name == "13"


def test_optional_groups_switch_on_and_off_in_any_order():
    hp = Top().override_from_dict({"rewards.adaptive_kl.target": "6", "rewards.adaptive_kl": "on"})
    assert hp.rewards.adaptive_kl == Controller(target=6.0, horizon=10000)
    hp.override_from_dict({"rewards.adaptive_kl": "off"})
    assert hp.rewards.adaptive_kl is None
    # setting a field inside an `off` group switches it on with its defaults
    hp.override_from_dict({"rewards.adaptive_kl.horizon": 5})
    assert hp.rewards.adaptive_kl == Controller(target=None, horizon=5)


def test_json_round_trip_keeps_nesting_and_off_groups():
    hp = Top().override_from_dict({"rewards.adaptive_kl.target": 6.0, "seed": 1})
    data = json.loads(hp.to_json())
    assert data["rewards"]["adaptive_kl"] == {"target": 6.0, "horizon": 10000}
    assert Top.from_nested_dict(data) == hp
    off = Top()
    assert json.loads(off.to_json())["rewards"]["adaptive_kl"] is None
    assert Top.from_nested_dict(json.loads(off.to_json())) == off


def test_save_and_load_json_file(tmp_path):
    hp = Top().override_from_dict({"rewards.trained_model": "/runs/x/reward_model"})
    path = tmp_path / "train_policy_hparams.json"
    hp.save_json(str(path))
    assert Top.from_nested_dict(json.loads(path.read_text())) == hp


def test_loading_tolerates_unknown_keys_only_when_asked():
    data = {"seed": 3, "rewards": {"kl_coef": 0.1, "from_a_newer_version": 1}}
    with pytest.raises(HParamError, match="unknown hyperparameter 'rewards.from_a_newer_version'"):
        Top.from_nested_dict(data)
    hp = Top.from_nested_dict(data, strict=False)
    assert hp.seed == 3 and hp.rewards.kl_coef == 0.1
    assert hp.ignored_keys == ["rewards.from_a_newer_version"]


@pytest.mark.parametrize("overrides, message", [
    ({"rewards.kl_cof": 1}, "unknown hyperparameter 'rewards.kl_cof'; did you mean rewards.kl_coef"),
    ({"kl_coef": 1}, "unknown hyperparameter 'kl_coef' at this level; the full dotted name is rewards.kl_coef: "
                     "--rewards.kl_coef VALUE"),
    ({"seed": "abc"}, "seed: got 'abc', expected an integer or none"),
    ({"steps": "1.5"}, "steps: got '1.5', expected an integer"),
    ({"rewards.kl_coef": "high"}, "rewards.kl_coef: got 'high', expected a number"),
    ({"whiten": "maybe"}, r"whiten: got 'maybe', expected a boolean \(true/false/on/off\)"),
    ({"rewards": "on"}, "rewards is a group of hyperparameters; got 'on'"),
    ({"rewards.adaptive_kl": "sometimes"}, "accepted: on or off"),
    ({"steps": None}, "steps: got none, but steps is required"),
])
def test_override_errors_name_the_field_and_what_is_accepted(overrides, message):
    with pytest.raises(HParamError, match=message):
        Top().override_from_dict(overrides)


def test_validation_names_missing_fields_and_runs_check_hooks():
    hp = Top().override_from_dict({"rewards.adaptive_kl": "on"})
    with pytest.raises(HParamError, match=r"rewards.adaptive_kl.target is required \(a number\) but is not set"):
        hp.validate()
    hp.rewards.adaptive_kl.target = 6.0
    hp.validate()
    hp.steps = 0
    with pytest.raises(HParamError, match="steps must be positive, got 0"):
        hp.validate()
    hp.steps = "3"  # a wrongly typed value set from code is caught too
    with pytest.raises(HParamError, match="steps: got '3'"):
        hp.validate()


def test_dotted_names_and_flatten():
    assert "rewards.adaptive_kl.target" in Top.dotted_names()
    assert hyperparams.flatten({"a": {"b": 1, "c": {"d": None}}, "e": 2}) == {"a.b": 1, "a.c.d": None, "e": 2}
