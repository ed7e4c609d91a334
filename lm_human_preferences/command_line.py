"""How the command lines reach the commands: launch.py's arguments prepared for fire, and the checks of flag values
that every command line shares (true/false words, numbers in a range, --mpi).

fire evaluates every value as a Python literal: `--task.query_suffix '"x"'` would lose its quotes, `1,2` become a
tuple, a run NAME `7` an int, and a string field given `1e5` read "100000.0". The hyperparameters parse strings by
their declared types themselves, so `prepare_argv` hands fire each value as a quoted Python string literal, which
fire evaluates back to exactly the text typed. (fire's own way, its SetParseFn decorators, lists a bogus
FIRE_METADATA group in every --help.) Which flags are the command's own and which are hyperparameters is read
from the command function's signature: its parameters with a default are its flags, `**overrides` takes the rest.
"""

import collections
import inspect
import re
from typing import Callable, Dict, List, Optional

from lm_human_preferences.utils import hyperparams


def _flags(function: Callable) -> Dict[str, object]:
    """A command's flags and their defaults: its parameters with a default, which fire's help lists as flags (the
    others are its positional arguments; **overrides takes the hyperparameters)."""
    return {parameter.name: parameter.default for parameter in inspect.signature(function).parameters.values()
            if parameter.default is not inspect.Parameter.empty}


def switches(function: Callable) -> set:
    """A command's true/false flags (those whose default is a bool) and fire's `--noFLAG` (FLAG=False) of each:
    the flags of its own that may stand without a value."""
    names = {name for name, default in _flags(function).items() if isinstance(default, bool)}
    return names | {f"no{name}" for name in names}


def own_flags(function: Callable) -> set:
    """The flags that fire gives to the command's parameters, with the `--noFLAG` of its true/false ones; any
    other flag is a hyperparameter."""
    return set(_flags(function)) | switches(function)


def short_flags(function: Optional[Callable]) -> Dict[str, str]:
    """`-x` -> `--name` for each flag of a command whose first letter no other flag of it shares: the short forms
    its --help lists (`-s` is --save_dir for train_policy, --seed for label, --scope for export). fire's parser
    cannot apply them itself: with **overrides in a signature it takes `-s` for a hyperparameter named s, and
    without it also counts the positional arguments (export's SAVE_DIR), so prepare_argv spells them out. `-h` is
    --help."""
    if function is None:
        return {}
    flags = list(_flags(function))
    letters = collections.Counter(name[0] for name in flags)
    return {f"-{name[0]}": f"--{name}" for name in flags if letters[name[0]] == 1 and name[0] != "h"}


def _is_flag(arg: str) -> bool:
    """fire's rule: `--name...` or `-x...`, but not a negative number."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def prepare_argv(commands: Dict[str, Callable], argv: List[str]) -> List[str]:
    """The command line `COMMAND ARGS...` of `commands` as fire should see it: every value quoted (module
    docstring), and

    * a bare hyperparameter flag (followed by another flag or nothing) means true: `--normalize_before`
      (fire reads a bare `--noX` as X=False, so it made that `rmalize_before=False`); a bare flag of the
      command's own that is not a true/false one (`--save_dir`, `-n`) is refused: it needs a value;
    * `--help` or `-h` anywhere before fire's `--` separator shows the command's help and runs nothing
      (fire took it for a hyperparameter named help).
    """
    argv = list(argv)
    separator = argv.index("--") if "--" in argv else len(argv)
    ours, fire_flags = argv[:separator], argv[separator:]
    if any(arg in ("--help", "-h") for arg in ours):
        return [arg for arg in ours[:1] if arg in commands] + ["--", "--help"]
    prepared = ours[:1]  # the command's name
    function = commands.get(ours[0]) if ours else None
    short = short_flags(function)
    own, valueless = (own_flags(function), switches(function)) if function is not None else (set(), set())
    for index in range(1, len(ours)):
        arg = ours[index]
        if not _is_flag(arg):
            prepared.append(repr(arg))
            continue
        name, equals, value = arg.partition("=")
        name = short.get(name, name)
        bare = not equals and (index + 1 == len(ours) or _is_flag(ours[index + 1]))
        if equals:
            prepared.append(f"{name}={value!r}")
        elif bare and name.lstrip("-").replace("-", "_") not in own:
            prepared.append(f"{name}={'true'!r}")
        elif bare and name.lstrip("-").replace("-", "_") not in valueless:
            raise ValueError(f"{arg} needs a value ({name} VALUE or {name}=VALUE)")
        else:
            prepared.append(name)  # its value is the next argument
    return prepared + fire_flags


# ----- flag values ------------------------------------------------------------------------------------------------

def true_or_false(value, flag: str) -> bool:
    """A true/false flag's value: fire's own True or False (`--flag`, `--noflag`), or the words the
    hyperparameters take (true/false, on/off, yes/no, 1/0)."""
    try:
        return hyperparams.parse_value(value, bool, False, f"--{flag}")
    except hyperparams.HParamError:
        raise ValueError(f"--{flag}: got {value!r}, expected true or false") from None


def number(value, kind: type, flag: str, accepted: str, minimum, maximum=None):
    """A flag's number of `kind` (int or float), at least `minimum` (and at most `maximum`), from what fire hands
    over (text, or a number given in Python); else `FLAG: got VALUE, expected ACCEPTED`."""
    try:
        parsed = None if isinstance(value, bool) else kind(str(value))  # int("2.5") fails: no silent rounding
    except ValueError:
        parsed = None
    if parsed is None or parsed < minimum or (maximum is not None and not parsed <= maximum):
        raise ValueError(f"{flag}: got {value!r}, expected {accepted}")
    return parsed


def mpi_ranks(value) -> Optional[int]:
    """--mpi's value: a positive number of processes, or None when not given."""
    return None if value is None else number(value, int, "--mpi", "a positive number of processes", 1)
