"""Learning curves from a run's TensorBoard events: `learning_curves.png` in every run directory, and
`./launch.py plot RUN_DIR [RUN_DIR ...]`, several runs (the seeds of a sweep) in one figure.

The curves are what the run logged under `tb/reward_model` (reward-model training: a train_reward run, or a policy
run that trained its reward model first or online) and `tb/ppo` (PPO), read with `stats.read_scalars`. A panel is
drawn when a run logged one of its tags, so a reward run gets the reward model's panels and a policy run PPO's,
plus the reward model's when it trained one; the demo's synthetic judge adds its true score, and an online run's
label rounds are dotted vertical lines on the PPO panels.

Several runs: each tag's mean over the runs that logged it is a line, their spread a band (±1 sample standard
deviation, or min-max), and each run a faint line. Runs that logged different steps (another log_interval, a run
still going) are compared on the steps all of them logged: the mean and the band use those steps only, while each
faint line shows every step of its run.

The PNG records what it shows (panel titles, tags, runs) as JSON in its `Description` text chunk, so scripts and
tests can check a figure without looking at it. matplotlib is used through its Agg canvas, never pyplot: drawing
changes no global backend, so a trainer called from a notebook leaves the notebook's figures alone.
"""

import glob
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lm_human_preferences.utils import files, mpi, stats

FILENAME = "learning_curves.png"  # in every train_reward / train_policy run directory
DEFAULT_OUTPUT = "plot.png"  # `./launch.py plot`, in the current directory
PPO_X, REWARD_X = "PPO update", "reward-model step"
ONLINE_ROUNDS_TAG = "online/labels"  # logged at the PPO update of each online round (online_labels.py)
BANDS = {"std": "±1 SD", "minmax": "min–max"}  # --band: the spread drawn around the mean of several runs
BAND_MEANINGS = {"std": "±1 sample standard deviation (n − 1)", "minmax": "min to max"}

Points = List[Tuple[int, float]]  # (step, value), in step order
Scalars = Dict[str, Points]  # tag -> points: what stats.read_scalars returns


@dataclass(frozen=True)
class Series:
    tag: str
    label: str  # its legend entry
    kind: str = "line"  # SPARSE: logged every log_interval steps (held-out metrics), dots on the line;
    #                     NOISY: one minibatch per step, drawn faint under its running mean (one run)


SPARSE, NOISY = "sparse", "noisy"


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    xlabel: str  # PPO_X or REWARD_X
    series: Tuple[Series, ...]


def _panel(title, ylabel, xlabel, *series) -> Panel:
    return Panel(title, ylabel, xlabel, tuple(Series(*s) for s in series))


# Every panel a figure may hold, in order; a figure holds those whose tags some run logged.
PANELS = (
    _panel("judge's true score (synthetic judge)", "score", PPO_X, ("objective/judge", "judge")),
    _panel("score of the rollouts", "reward", PPO_X, ("objective/score", "reward model's score"),
           ("objective/score_total", "score − kl_coef·KL")),
    _panel("KL to the reference policy", "nats per response", PPO_X, ("objective/kl", "KL")),
    _panel("kl_coef", "kl_coef", PPO_X, ("objective/kl_coef", "kl_coef")),
    _panel("policy entropy (rollouts)", "nats per response", PPO_X, ("objective/entropy", "entropy")),
    _panel("value function: loss", "loss", PPO_X, ("ppo/loss/value", "value loss")),
    _panel("value function: explained variance", "1 − error / var(returns)", PPO_X,
           ("ppo/val/var_explained", "explained variance")),
    _panel("clip fractions", "fraction of tokens", PPO_X, ("ppo/policy/clipfrac", "policy"),
           ("ppo/val/clipfrac", "value")),
    _panel("policy change per step: approx. KL", "nats per token", PPO_X, ("ppo/policy/approxkl", "approx. KL")),
    _panel("reward model: loss", "loss", REWARD_X, ("train_reward/minibatch/loss", "train", NOISY),
           ("train_reward/valid/loss", "held out", SPARSE)),
    _panel("reward model: accuracy", "accuracy", REWARD_X, ("train_reward/minibatch/accuracy", "train", NOISY),
           ("train_reward/valid/accuracy", "held out", SPARSE)),
    _panel("reward model: correlation with the labels", "Pearson's r", REWARD_X,
           ("train_reward/minibatch/corr", "train", NOISY), ("train_reward/valid/corr", "held out", SPARSE)),
)


# ----- the numbers ------------------------------------------------------------------------------------------------

@dataclass
class Curve:
    """One tag over the runs that logged it."""
    runs: List[Tuple[np.ndarray, np.ndarray]]  # each such run's (steps, values)
    steps: np.ndarray  # the steps every one of those runs logged
    mean: np.ndarray  # [len(steps)]: the mean over the runs at each of `steps`
    low: np.ndarray  # the band: mean − SD or the minimum (the mean itself for one run)
    high: np.ndarray
    all_steps: bool  # whether `steps` holds every step of every run (False: some were left out)


def _by_step(points: Points) -> Dict[int, float]:
    """The value at each step; a step logged twice keeps its last value."""
    return {int(step): float(value) for step, value in points}


def aggregate(per_run: Sequence[Points], band: str = "std") -> Curve:
    """The mean and spread of one tag over several runs' points, on the steps all of them logged."""
    if band not in BANDS:
        raise ValueError(f"--band {band!r}: expected one of {', '.join(BANDS)}")
    maps = [_by_step(points) for points in per_run]
    steps = np.array(sorted(set.intersection(*(set(m) for m in maps))), dtype=np.int64)
    values = np.array([[m[s] for s in steps] for m in maps], dtype=np.float64).reshape(len(maps), len(steps))
    mean = values.mean(axis=0)
    if len(maps) == 1:
        low = high = mean
    elif band == "std":
        spread = values.std(axis=0, ddof=1)
        low, high = mean - spread, mean + spread
    else:
        low, high = values.min(axis=0), values.max(axis=0)
    runs = [(np.array(sorted(m), dtype=np.int64), np.array([m[s] for s in sorted(m)])) for m in maps]
    return Curve(runs, steps, mean, low, high, all_steps=all(len(m) == len(steps) for m in maps))


PANEL_SIZE = (4.8, 3.3)  # inches of figure per panel, margins included
SMOOTH_FROM = 50  # a NOISY series of one run with this many points or more is drawn under its running mean


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the window − 1 before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


# ----- runs on disk -----------------------------------------------------------------------------------------------

def has_events(run_dir: str) -> bool:
    return bool(glob.glob(os.path.join(run_dir, "tb", "**", "events.out.tfevents.*"), recursive=True))


def read_run(run_dir: str) -> Scalars:
    """Every scalar a run logged, from RUN_DIR/tb (tb/ppo and tb/reward_model)."""
    from lm_human_preferences.utils import devices
    devices.import_tensorflow()  # the event protos come with TensorFlow: load it without its start-up notices
    return stats.read_scalars(os.path.join(run_dir, "tb"))


def _natural_key(text: str):
    """seed2 before seed10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


EXPECTED_RUN = ("a train_reward or train_policy run directory (TensorBoard event files under RUN_DIR/tb/, e.g. "
                "tb/ppo or tb/reward_model), or a sweep's directory SAVE_DIR/NAME whose trial directories are such "
                "runs")


def expand_runs(paths: Sequence[str]) -> List[str]:
    """The run directories named by `paths`: a run directory stands for itself, a sweep's directory (no events of
    its own, trial directories with events) for its trials in natural order. ValueError naming a path that is
    neither."""
    runs = []
    for path in paths:
        path = os.path.expanduser(str(path))
        if not os.path.isdir(path):
            what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
            raise ValueError(f"{path} {what}; expected {EXPECTED_RUN}")
        if has_events(path):
            found = [path]
        else:
            subdirectories = sorted((entry.name for entry in os.scandir(path) if entry.is_dir()), key=_natural_key)
            found = [os.path.join(path, name) for name in subdirectories if has_events(os.path.join(path, name))]
        if not found:
            raise ValueError(f"{path} holds no TensorBoard events (none under {os.path.join(path, 'tb')}/, nor in "
                             f"its subdirectories' tb/); expected {EXPECTED_RUN}")
        runs.extend(run for run in found if os.path.realpath(run) not in {os.path.realpath(r) for r in runs})
    return runs


def run_labels(run_dirs: Sequence[str]) -> List[str]:
    """Short names for the legend: the directories' names, or their paths below the common parent when names repeat."""
    names = [os.path.basename(os.path.normpath(run)) for run in run_dirs]
    if len(set(names)) == len(names):
        return names
    parent = os.path.commonpath([os.path.abspath(run) for run in run_dirs])
    return [os.path.relpath(os.path.abspath(run), parent) for run in run_dirs]


# ----- the figure -------------------------------------------------------------------------------------------------

@dataclass
class Drawn:
    """What a figure shows (also in the PNG's Description chunk, as JSON)."""
    path: str
    panels: List[str]  # the titles, in order
    tags: List[str]  # every tag drawn
    runs: List[str]  # the runs' legend names
    band: Optional[str] = None  # several runs: BANDS key
    partial_tags: List[str] = field(default_factory=list)  # tags whose runs logged different steps
    online_rounds: List[int] = field(default_factory=list)  # PPO updates marked as online label rounds

    def record(self) -> dict:
        return {"panels": self.panels, "tags": self.tags, "runs": self.runs, "band": self.band,
                "partial_tags": self.partial_tags, "online_rounds": self.online_rounds}

    def summary(self) -> str:
        """What `./launch.py plot` prints."""
        runs = f"{len(self.runs)} runs ({', '.join(self.runs)}): line the mean, band {BAND_MEANINGS[self.band]}" \
            if self.band else f"run {self.runs[0]}"
        text = f"wrote {self.path}: {runs}; {len(self.panels)} panels: {', '.join(self.panels)}"
        if self.partial_tags:
            text += (f"\nthe runs logged different steps of {', '.join(self.partial_tags)}: their mean and band use "
                     f"only the steps every run logged (each faint line shows all of its run's steps)")
        return text


def draw(runs: Dict[str, Scalars], output: str, *, title: str, band: str = "std") -> Optional[Drawn]:
    """One figure of the panels some run logged, written atomically to `output` (replacing it); None (nothing
    written) when the runs logged none. One run: its curves. Several: mean line, spread band, faint runs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    several = len(runs) > 1
    panels = []  # (panel, [(series, curve)])
    for panel in PANELS:
        curves = [(s, aggregate([r[s.tag] for r in runs.values() if r.get(s.tag)], band)) for s in panel.series
                  if any(r.get(s.tag) for r in runs.values())]
        if curves:
            panels.append((panel, curves))
    if not panels:
        return None
    rounds = sorted({step for r in runs.values() for step, _ in r.get(ONLINE_ROUNDS_TAG, [])})

    columns = min(3, len(panels)) if len(panels) <= 9 else 4
    rows = math.ceil(len(panels) / columns)
    # A fixed layout in inches (matplotlib's constrained layout would take most of the drawing time): each panel
    # PANEL_SIZE, with room around it for tick labels, axis labels and the title; the figure's title above.
    header = 0.6 if several else 0.35
    width, height = PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + header
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    left, right, bottom, gap_x, gap_y = 0.8, 0.2, 0.55, 0.85, 0.8  # inches
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                           top=1 - (header + 0.3) / height, wspace=gap_x / (PANEL_SIZE[0] - gap_x),
                           hspace=gap_y / (PANEL_SIZE[1] - gap_y))
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    drawn = Drawn(output, [], [], list(runs), band if several else None, online_rounds=rounds)
    first_ppo = True
    for axis, (panel, curves) in zip(axes, panels):
        handles, smoothed = [], False
        for index, (series, curve) in enumerate(curves):
            color = f"C{index}"
            marker = "o" if series.kind == SPARSE or len(curve.steps) <= 30 else None
            if len(curve.runs) > 1:
                for steps, values in curve.runs:
                    axis.plot(steps, values, color=color, alpha=0.3, linewidth=0.7)
                axis.fill_between(curve.steps, curve.low, curve.high, color=color, alpha=0.2, linewidth=0)
                line, = axis.plot(curve.steps, curve.mean, color=color, linewidth=1.8, marker=marker, markersize=3)
                handles.append(((Patch(color=color, alpha=0.3), line),
                                f"{series.label}: mean {BANDS[band]} of {len(curve.runs)} runs"))
            else:
                steps, values = curve.runs[0]
                label = series.label
                if series.kind == NOISY and len(steps) >= SMOOTH_FROM:
                    window = len(steps) // 20
                    axis.plot(steps, values, color=color, alpha=0.3, linewidth=0.7)
                    values, marker, label = running_mean(values, window), None, f"{label} (mean of {window} steps)"
                    smoothed = True
                line, = axis.plot(steps, values, color=color, linewidth=1.3, marker=marker, markersize=3)
                handles.append((line, label))
            drawn.tags.append(series.tag)
            if not curve.all_steps:
                drawn.partial_tags.append(series.tag)
        if rounds and panel.xlabel == PPO_X:
            for step in rounds:
                axis.axvline(step, color="gray", linestyle=":", linewidth=1)
            if first_ppo:
                handles.append((Line2D([], [], color="gray", linestyle=":"), "online label round"))
            first_ppo = False
        if len(handles) > 1 or several or smoothed:
            axis.legend([h for h, _ in handles], [label for _, label in handles], fontsize=7.5, loc="best",
                        framealpha=0.8)
        axis.set_title(panel.title, fontsize=10.5)
        axis.set_xlabel(panel.xlabel, fontsize=9)
        axis.set_ylabel(panel.ylabel, fontsize=9)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        drawn.panels.append(panel.title)
    for axis in axes[len(panels):]:  # the grid's empty places
        axis.set_visible(False)

    lines = [title]
    if several:
        lines.append(f"line: mean over the runs; band: {BAND_MEANINGS[band]}; faint lines: each run"
                     + ("; where runs logged different steps, mean and band use the steps all of them logged"
                        if drawn.partial_tags else ""))
    figure.suptitle("\n".join(lines), fontsize=11, y=1 - 0.12 / height, va="top")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Title": title, "Description": json.dumps(drawn.record())})
    files.write_bytes_atomic(output, buffer.getvalue())
    return drawn


def learning_curves(run_dir: str, *, output: Optional[str] = None, title: Optional[str] = None) -> Optional[Drawn]:
    """Draw one run's learning curves to RUN_DIR/learning_curves.png (or `output`), replacing an earlier drawing of
    them; None when the run logged nothing yet."""
    if not has_events(run_dir):
        return None
    return draw({os.path.basename(os.path.normpath(run_dir)): read_run(run_dir)},
                output or os.path.join(run_dir, FILENAME), title=f"learning curves of {title or run_dir}")


class CurvesWhenDone:
    """`with plots.CurvesWhenDone(local_dir, save_dir):` around a trainer's body. When the body ends, or leaves on
    an exception (trainer.RunInterrupted after a stop signal, or an error), rank 0 draws the run's learning curves
    to LOCAL_DIR/learning_curves.png (uploaded to a gs:// SAVE_DIR). Nested uses (the reward model that
    train_policy trains first) draw once, at the outermost. Drawing never changes how the run ends: a failure to
    draw is one line on stderr, and the run's own exception goes on. A second Ctrl-C (KeyboardInterrupt, "stop at
    once") draws nothing."""

    _depth = 0

    def __init__(self, local_dir: str, save_dir: Optional[str] = None):
        self.local_dir, self.save_dir = local_dir, save_dir or local_dir

    def __enter__(self):
        CurvesWhenDone._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        CurvesWhenDone._depth -= 1
        if CurvesWhenDone._depth == 0 and (exc_type is None or issubclass(exc_type, Exception)) and mpi.is_root():
            draw_quietly(self.local_dir, self.save_dir)
        return False


def draw_quietly(local_dir: str, save_dir: str) -> Optional[Drawn]:
    """learning_curves(local_dir), uploaded for a gs:// save_dir, and a line saying where; any failure is reported
    in one line on stderr and returns None."""
    try:
        drawn = learning_curves(local_dir, title=save_dir)
        if drawn is not None:
            files.sync_up(local_dir, save_dir)
            stats.log(f"learning curves: {files.join(save_dir, FILENAME)}")
        return drawn
    except Exception as error:  # noqa: BLE001 - a figure is never worth a run or its own error message
        message = " ".join(f"{type(error).__name__}: {error}".split())
        print(f"warning: the learning curves of {save_dir} were not drawn ({message}); the run is not affected",
              file=sys.stderr, flush=True)
        return None


# ----- ./launch.py plot -------------------------------------------------------------------------------------------

def check_output(output: str, force: bool) -> str:
    """The figure's path, or ValueError: not a .png name, a missing directory, or an existing file without force."""
    output = os.path.expanduser(str(output))
    if not output.lower().endswith(".png"):
        raise ValueError(f"--output {output}: expected a file name ending in .png")
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; expected a .png file name")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ValueError(f"--output {output}: its directory {directory} does not exist")
    if os.path.exists(output) and not force:
        raise ValueError(f"--output {output} exists and is never overwritten silently: choose another --output, "
                         f"or add --force to replace it")
    return output


def plot_command(run_dirs: Sequence[str], output: Optional[str] = None, force: bool = False,
                 band: str = "std") -> Drawn:
    """`./launch.py plot`: the runs (sweeps expanded to their trials) in one figure; everything the user gave is
    checked before anything is read or written."""
    if not run_dirs:
        raise ValueError(f"plot: no RUN_DIR given; expected one or more of: {EXPECTED_RUN}")
    if band not in BANDS:
        raise ValueError(f"--band {band!r}: expected {' or '.join(BANDS)} ({', '.join(BAND_MEANINGS.values())})")
    output = check_output(DEFAULT_OUTPUT if output is None else output, force)
    runs = expand_runs(run_dirs)
    labels = run_labels(runs)
    scalars = {label: read_run(run) for label, run in zip(labels, runs)}
    if len(runs) == 1:
        title = f"learning curves of {runs[0]}"
    else:
        title = f"{len(runs)} runs: {', '.join(labels)}"
    drawn = draw(scalars, output, title=title, band=band)
    if drawn is None:
        raise ValueError(f"{', '.join(runs)}: their events hold none of the curves drawn here (reward-model loss, "
                         f"PPO score, KL, ...); expected {EXPECTED_RUN}")
    return drawn
