"""Typed hyperparameters: nested dataclasses with dotted overrides, string parsing, JSON and validation.

Every hyperparameter group is a ``@dataclass`` subclass of :class:`HParams`. Groups nest (``task.policy``);
an ``Optional[Group] = None`` field is a group that can be switched ``on`` (its defaults) or ``off`` (None),
as in the 2019 command lines (``--rewards.train_new_model off --rewards.trained_model PATH``).

Overrides come in two shapes: typed values from code (``{"ppo.lr": 1e-5}``) and strings from a command line
(``{"ppo.lr": "1e-5"}``); both go through :meth:`HParams.override_from_dict`, which parses strings by the declared
type. Names are the 2019 ones so that saved ``*_hparams.json`` files and users' command lines keep working.
"""

import dataclasses
import difflib
import json
import typing
from typing import Any, Dict, Iterator, List, Tuple

_NONE_STRINGS = {"none", "null"}
_TRUE_STRINGS = {"true", "on", "yes", "1"}
_FALSE_STRINGS = {"false", "off", "no", "0"}


class HParamError(ValueError):
    """A bad hyperparameter name or value; the message names the dotted field and what is accepted."""


def _unwrap_optional(annotation) -> Tuple[Any, bool]:
    """`Optional[T]` -> (T, True); `T` -> (T, False)."""
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _is_group(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, HParams)


def _type_name(cls, optional: bool) -> str:
    name = {int: "an integer", float: "a number", bool: "a boolean (true/false/on/off)", str: "a string"}.get(
        cls, getattr(cls, "__name__", str(cls)))
    return name + (" or none" if optional else "")


def parse_value(value: Any, cls, optional: bool, where: str):
    """Convert `value` (a typed value or a command-line string) to the declared type `cls`."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS and cls is not str):
        if optional:
            return None
        raise HParamError(f"{where}: got none, but {where} is required ({_type_name(cls, False)})")
    expected = _type_name(cls, optional)
    if cls is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
            return value.strip().lower() in _TRUE_STRINGS
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif cls is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        else:
            try:
                number = float(value.replace("_", "")) if isinstance(value, str) else float(value)
            except (TypeError, ValueError):
                number = None
            if number is not None and number.is_integer():
                return int(number)
    elif cls is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                pass
    elif cls is str:
        if isinstance(value, str):
            if optional and value.strip().lower() in _NONE_STRINGS:
                return None
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # fire turns `--x 13` into 13; a string field wanted the text
    else:
        raise HParamError(f"{where}: unsupported hyperparameter type {cls!r}")
    raise HParamError(f"{where}: got {value!r}, expected {expected}")


@dataclasses.dataclass
class HParams:
    """Base of every hyperparameter group. Subclasses are dataclasses whose fields have one-line comments."""

    # ----- introspection -------------------------------------------------------------------------------------
    @classmethod
    def _field_types(cls) -> Dict[str, Tuple[Any, bool]]:
        hints = typing.get_type_hints(cls)
        return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def dotted_names(cls, prefix: str = "") -> List[str]:
        """Every settable dotted name, including the fields inside optional groups."""
        names = []
        for name, (ftype, optional) in cls._field_types().items():
            full = prefix + name
            names.append(full)
            if _is_group(ftype):
                names.extend(ftype.dotted_names(full + "."))
        return names

    def _iter_fields(self) -> Iterator[Tuple[str, Any, Any, bool]]:
        for name, (ftype, optional) in self._field_types().items():
            yield name, getattr(self, name), ftype, optional

    # ----- overrides -----------------------------------------------------------------------------------------
    def override_from_dict(self, overrides: Dict[str, Any]) -> "HParams":
        """Apply {dotted.name: value}; values may be typed or strings (parsed by the declared type).

        Group switches (`rewards.adaptive_kl on`) apply before the fields inside them, so a flat dict
        in any order works. Setting a field inside an `off` optional group switches it on.
        """
        known = type(self).dotted_names()
        for name in overrides:
            if name not in known:
                raise unknown_name_error(name, known)
        for name, value in sorted(overrides.items(), key=lambda item: item[0].count(".")):
            self._set_dotted(name, value, name)
        return self

    def _set_dotted(self, dotted: str, value: Any, full_name: str):
        head, _, rest = dotted.partition(".")
        ftype, optional = self._field_types()[head]
        if rest:
            group = getattr(self, head)
            if group is None:
                group = ftype()
                setattr(self, head, group)
            group._set_dotted(rest, value, full_name)
        elif _is_group(ftype):
            setattr(self, head, self._parse_group_switch(value, ftype, optional, full_name))
        else:
            setattr(self, head, parse_value(value, ftype, optional, full_name))

    @staticmethod
    def _parse_group_switch(value, ftype, optional, where):
        if isinstance(value, ftype):
            return value
        if isinstance(value, dict):
            return ftype.from_nested_dict(value, where=where + ".")
        switch = value.strip().lower() if isinstance(value, str) else value
        if optional and switch in ("on", True, "true"):
            return ftype()
        if optional and (switch in ("off", False, "false", None) or switch in _NONE_STRINGS):
            return None
        accepted = "on or off" if optional else f"values for its fields (--{where}.FIELD VALUE)"
        raise HParamError(f"{where} is a group of hyperparameters; got {value!r}, accepted: {accepted}")

    # ----- JSON ----------------------------------------------------------------------------------------------
    def to_nested_dict(self) -> Dict[str, Any]:
        out = {}
        for name, value, ftype, _ in self._iter_fields():
            out[name] = value.to_nested_dict() if isinstance(value, HParams) else value
        return out

    @classmethod
    def from_nested_dict(cls, data: Dict[str, Any], *, strict: bool = True, where: str = "") -> "HParams":
        """Build from a nested dict (a saved `*_hparams.json`). With strict=False unknown keys are ignored
        (returned in `.ignored_keys`), for reading runs saved by other versions."""
        if not isinstance(data, dict):
            raise HParamError(f"{where or 'hyperparameters'}: expected a JSON object, got {type(data).__name__}")
        hp = cls()
        ignored = []
        types = cls._field_types()
        for key, value in data.items():
            full = where + key
            if key not in types:
                if strict:
                    raise unknown_name_error(full, [where + n for n in cls.dotted_names()])
                ignored.append(full)
                continue
            ftype, optional = types[key]
            if _is_group(ftype):
                if value is None:
                    if not optional:
                        raise HParamError(f"{full}: a required group cannot be null")
                    setattr(hp, key, None)
                else:
                    child = ftype.from_nested_dict(value, strict=strict, where=full + ".")
                    ignored.extend(getattr(child, "ignored_keys", []))
                    setattr(hp, key, child)
            else:
                setattr(hp, key, parse_value(value, ftype, optional, full))
        hp.ignored_keys = ignored
        return hp

    def to_json(self) -> str:
        return json.dumps(self.to_nested_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str):
        from lm_human_preferences.utils import files
        files.write_text_atomic(path, self.to_json() + "\n")

    # ----- validation ----------------------------------------------------------------------------------------
    def validate(self, prefix: str = "") -> "HParams":
        """Check that required fields are set and every value has its declared type; then `check()` hooks."""
        for name, value, ftype, optional in self._iter_fields():
            full = prefix + name
            if value is None:
                if not optional:
                    raise HParamError(f"{full} is required ({_type_name(ftype, False)}) but is not set; "
                                      f"set it with --{full} VALUE")
                continue
            if _is_group(ftype):
                if not isinstance(value, ftype):
                    raise HParamError(f"{full}: expected a {ftype.__name__} group, got {value!r}")
                value.validate(full + ".")
            else:
                parsed = parse_value(value, ftype, optional, full)
                if type(parsed) is not type(value) and not (ftype is float and isinstance(value, int)):
                    raise HParamError(f"{full}: got {value!r}, expected {_type_name(ftype, optional)}")
        self.check(prefix)
        return self

    def check(self, prefix: str):
        """Cross-field rules of a group; override and raise HParamError naming `prefix + field`."""


def flatten(nested: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested hyperparameter dict as dotted names."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def unknown_name_error(name: str, known: List[str]) -> HParamError:
    """The error for a dotted name that no group declares, suggesting the closest known names."""
    nested = [n for n in known if n.endswith("." + name)]
    if nested:  # a right name at the wrong level: `--labels.source` of a policy run's reward model
        return HParamError(f"unknown hyperparameter {name!r} at this level; the full dotted name is "
                           f"{' or '.join(nested)}: --{nested[0]} VALUE")
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if not close:  # a right field name under the wrong group: `--kl_coef` for `rewards.kl_coef`
        last = name.rsplit(".", 1)[-1]
        close = [n for n in known if n.rsplit(".", 1)[-1] == last][:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known names: {', '.join(known)}"
    return HParamError(f"unknown hyperparameter {name!r}{hint}")


def require(condition: bool, message: str):
    """Raise HParamError(message) unless condition: for `check()` hooks (never `assert` on user input)."""
    if not condition:
        raise HParamError(message)
