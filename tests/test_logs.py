"""One way to log (rise_edge.logs): messages through `logging`, the command line's --quiet,
--verbose and --log-file, and progress bars that become lines where stderr is not a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import train_cli_args

from rise_edge import logs
from rise_edge.cli import main


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test starts with rise-edge's logging as a library user finds it (unconfigured)."""
    yield
    root = logs.logger()
    for handler in [h for h in root.handlers if getattr(h, "_rise_edge", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.NOTSET)
    root.propagate = True
    logs._bars_hidden = False


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_tqdm_on_a_terminal_and_lines_elsewhere(monkeypatch, caplog) -> None:
    from tqdm import tqdm

    assert isinstance(logs.progress(total=3, file=_Terminal()), tqdm)
    assert logs.progress(total=3, file=_Terminal(), enabled=False).disable
    monkeypatch.setenv(logs.PROGRESS_ENV, "0")  # a line at every update
    caplog.set_level(logging.INFO, logger="rise_edge")
    with logs.progress(total=3, desc="work", unit="img", file=io.StringIO()) as bar:
        assert isinstance(bar, logs.LineProgress)
        bar.update(2)
        bar.set_postfix({"loss": "0.5"})
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "rise_edge.progress"]
    assert lines[0].startswith("work: 2/3 img in ") and "img/s" in lines[0]
    assert lines[-1].startswith("work: 3/3 img") and lines[-1].endswith("loss=0.5")
    assert list(logs.progress(range(4), file=io.StringIO())) == [0, 1, 2, 3]


def test_the_interval_comes_from_the_environment_and_bad_values_fall_back(monkeypatch) -> None:
    for text, expected in (("5", 5.0), ("", 30.0), ("soon", 30.0), ("nan", 30.0), ("-1", 30.0)):
        monkeypatch.setenv(logs.PROGRESS_ENV, text)
        assert logs.interval_s() == expected


def test_quiet_hides_info_and_bars_verbose_shows_debug(capsys) -> None:
    logs.configure(logging.WARNING)
    logs.logger("bench").info("an info line")
    logs.logger("bench").warning("warning: a warning")
    assert logs.progress(total=2, file=_Terminal()).disable
    err = capsys.readouterr().err
    assert "an info line" not in err and "warning: a warning" in err
    logs.configure(logging.DEBUG)
    logs.logger("bench").debug("a debug line")
    assert "a debug line" in capsys.readouterr().err
    # a library that configured the root logger does not get rise-edge's lines a second time
    other = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(other)
    try:
        logs.logger("bench").info("once")
        assert capsys.readouterr().err.count("once") == 1
    finally:
        logging.getLogger().removeHandler(other)


def test_the_command_line_options(tmp_path: Path, tiny_run: Path) -> None:
    log_file = tmp_path / "rise-edge.log"
    args = ["bench", str(tiny_run), "--batch", "1", "--iterations", "1", "--warmup", "0"]
    loud = CliRunner().invoke(main, ["--log-file", str(log_file), *args])
    assert loud.exit_code == 0, loud.output
    assert "[bench] pytorch: loading" in loud.output
    written = log_file.read_text()
    assert " INFO rise_edge.bench: [bench] pytorch: loading" in written  # time-stamped, named
    quiet = CliRunner().invoke(main, ["--quiet", *args])
    assert quiet.exit_code == 0, quiet.output
    assert "[bench]" not in quiet.output and "pytorch" in quiet.output  # the table still prints
    both = CliRunner().invoke(main, ["--quiet", "--verbose", *args])
    assert both.exit_code == 2 and both.output.count("\n") == 1 and "not both" in both.output
    full = CliRunner().invoke(main, ["--log-file", "/dev/full", *args])  # a disk that is full
    assert full.exit_code == 0, full.output
    assert full.output.count("warning: --log-file /dev/full: No space left on device") == 1
    assert "Traceback" not in full.output and "Logging error" not in full.output
    nowhere = CliRunner().invoke(main, ["--log-file", str(tmp_path / "no" / "such.log"), *args])
    assert nowhere.exit_code == 2 and "--log-file" in nowhere.output
    assert nowhere.output.count("\n") == 1


def test_the_python_api_logs_and_never_prints(tiny_run: Path, capsys, caplog) -> None:
    from rise_edge.api import Run

    caplog.set_level(logging.INFO, logger="rise_edge")
    Run(tiny_run).bench(batch_sizes=[1], iterations=1, warmup=0, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # unconfigured logging shows INFO nowhere
    assert any(r.getMessage() == "[bench] pytorch: loading" for r in caplog.records)


def test_a_log_captured_from_a_pipe_holds_lines_not_redraws(tiny_data_root: Path, recipe_file: Path,
                                                            tmp_path: Path) -> None:
    """`rise-edge train ... 2> file`: progress as periodic lines, no carriage returns."""
    env = {**os.environ, logs.PROGRESS_ENV: "0", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "wb") as err:
        subprocess.run([sys.executable, "-m", "rise_edge.cli", "train", str(recipe_file),
                        *train_cli_args(tiny_data_root, tmp_path / "run", "--set", "train.steps=4",
                                        "--set", "train.eval_every=4")],
                       env=env, stdout=subprocess.DEVNULL, stderr=err, check=True, timeout=300)
    captured = (tmp_path / "stderr.txt").read_bytes().decode()
    assert "\r" not in captured and "\x1b[" not in captured
    assert any(line.startswith("train run: 4/4 step in ") for line in captured.splitlines())
