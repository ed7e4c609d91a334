"""Statistics logging: event files written and read back, averaging over ranks, the console line."""

import glob
import json
import os
import textwrap

import pytest

from lm_human_preferences.utils import stats

from mpi_programs import rank_lines, run


def test_written_scalars_read_back_in_step_order(tmp_path):
    logdir = str(tmp_path / "tb")
    with stats.StatsLogger(logdir, enabled=True) as logger:
        for step in (1, 2, 3):
            returned = logger.record(step, {"objective/score": 0.5 * step, "ppo/loss/total": -step, "n": 7})
            assert returned == {"objective/score": 0.5 * step, "ppo/loss/total": float(-step), "n": 7.0}
    scalars = stats.read_scalars(logdir)
    assert sorted(scalars) == ["n", "objective/score", "ppo/loss/total"]
    assert scalars["objective/score"] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert scalars["ppo/loss/total"] == [(1, -1.0), (2, -2.0), (3, -3.0)]
    assert [step for step, _ in scalars["n"]] == [1, 2, 3]


def test_read_scalars_returns_each_tag_in_step_order_whatever_the_write_order(tmp_path):
    with stats.StatsLogger(str(tmp_path), enabled=True) as logger:
        for step in (3, 1, 2):  # e.g. a resumed run that logs earlier steps again
            logger.write(step, {"loss": 10.0 * step})
        logger.write(4, {"other": 1.0})  # tags need not share steps
    assert stats.read_scalars(str(tmp_path)) == {"loss": [(1, 10.0), (2, 20.0), (3, 30.0)], "other": [(4, 1.0)]}


def test_values_are_stored_as_float32_summaries(tmp_path):
    with stats.StatsLogger(str(tmp_path), enabled=True) as logger:
        logger.write(5, {"lr": 1e-5, "kl": 6.123456789})
    scalars = stats.read_scalars(str(tmp_path))
    assert scalars["lr"][0] == (5, pytest.approx(1e-5, rel=1e-6))
    assert scalars["kl"][0] == (5, pytest.approx(6.123456789, rel=1e-6))


def test_read_scalars_finds_event_files_in_subdirectories(tmp_path):
    for name, value in (("reward", 1.0), ("policy", 2.0)):
        with stats.StatsLogger(str(tmp_path / name), enabled=True) as logger:
            logger.write(1, {name: value})
    assert stats.read_scalars(str(tmp_path)) == {"reward": [(1, 1.0)], "policy": [(1, 2.0)]}
    assert stats.read_scalars(str(tmp_path / "missing")) == {}


def test_a_disabled_logger_writes_and_prints_nothing_but_still_averages(tmp_path, capsys):
    logdir = tmp_path / "tb"
    logger = stats.StatsLogger(str(logdir), enabled=False)
    assert logger.record(1, {"a": 2}) == {"a": 2.0}
    logger.write(2, {"a": 1.0})  # write, too, is a no-op on a disabled logger
    logger.close()
    assert not glob.glob(str(logdir / "**" / "events.*"), recursive=True)
    assert capsys.readouterr().out == ""
    assert not logdir.exists()
    assert stats.read_scalars(str(logdir)) == {}


def test_enabled_defaults_to_rank_0_in_a_single_process(tmp_path):
    logger = stats.StatsLogger(str(tmp_path))
    assert logger.enabled
    logger.close()


def test_compact_line_format():
    values = {"objective/score": 0.123456, "objective/kl": 12.0, "ppo/policy/clipfrac": 0.0, "other": 9.0}
    line = stats.compact_line(12, values, ["objective/score", "objective/kl", "objective/judge", "ppo/policy/clipfrac"],
                              step_name="update")
    # 4 significant digits; a key that this run did not log (objective/judge) is left out
    assert line == "update 12 | objective/score 0.1235 | objective/kl 12 | ppo/policy/clipfrac 0"
    assert stats.compact_line(3, values, []) == "step 3"


MPI_PROGRAM = textwrap.dedent("""
    import json, sys
    from lm_human_preferences.utils import mpi, stats
    logger = stats.StatsLogger(sys.argv[1])
    averaged = logger.record(1, {"loss": float(mpi.rank()), "score": 10.0 * (mpi.rank() + 1)})
    stats.log(stats.compact_line(1, averaged, ["loss"]))
    logger.close()
    print("RESULT", mpi.rank(), json.dumps({"enabled": logger.enabled, "averaged": averaged}), flush=True)
""")


def test_two_ranks_log_the_mean_once(tmp_path):
    program = tmp_path / "log_stats.py"
    program.write_text(MPI_PROGRAM)
    logdir = tmp_path / "tb"
    result = run(2, str(program), str(logdir))
    assert result.returncode == 0, result.stdout
    reports = {rank: json.loads(line) for rank, line in rank_lines(result.stdout, "RESULT").items()}
    assert reports == {rank: {"enabled": rank == 0, "averaged": {"loss": 0.5, "score": 15.0}} for rank in (0, 1)}
    assert result.stdout.count("step 1 | loss 0.5") == 1  # the console line comes from rank 0 only
    assert len(glob.glob(os.path.join(str(logdir), "events.*"))) == 1
    assert stats.read_scalars(str(logdir)) == {"loss": [(1, 0.5)], "score": [(1, 15.0)]}
