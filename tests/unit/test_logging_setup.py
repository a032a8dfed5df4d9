"""One logging setup for every command (monitoring.logs.configure_logging): what the console shows."""

from __future__ import annotations

import json
import logging

import pytest

from imgtrain import cli
from imgtrain.monitoring.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_a_rank_of_a_distributed_command_tags_its_lines_and_shows_warnings_only(tmp_path, capsys):
    configure_logging(3, is_main=False)
    log = logging.getLogger("imgtrain.train.trainer")
    log.info("not shown on rank 3")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err
    assert err.rstrip().endswith("[rank 3] WARNING imgtrain.train.trainer: shown")
    configure_logging(0, is_main=True, run_id="r", output_dir=tmp_path)
    logging.getLogger("imgtrain.train.trainer").info("step done")
    assert capsys.readouterr().err.rstrip().endswith("[rank 0] INFO imgtrain.train.trainer: step done")
    record = json.loads((tmp_path / "logs" / "rank0.jsonl").read_text())
    assert record["message"] == "step done" and record["run_id"] == "r" and record["rank"] == 0


def test_a_single_process_command_logs_info_without_a_rank_and_writes_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configure_logging()
    logging.getLogger("imgtrain.data.shards.prepare").info("wrote 3 shards")
    line = capsys.readouterr().err.rstrip()
    assert line.endswith(" INFO imgtrain.data.shards.prepare: wrote 3 shards") and "[rank" not in line
    assert list(tmp_path.iterdir()) == []


def test_every_command_of_the_command_line_gets_the_setup(capsys, monkeypatch):
    """A warning of any command (here `imgtrain status`) reaches the console as a formatted line, once."""

    def status(args, parser):
        logging.getLogger("imgtrain.tools.run_ops").warning("endpoint slow")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "status", (status, False))
    assert cli.main(["status", "somewhere"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" WARNING imgtrain.tools.run_ops: endpoint slow"), lines


def test_the_rank_file_and_its_run_directory_appear_with_the_first_line(tmp_path):
    run = tmp_path / "run"
    configure_logging(0, is_main=True, output_dir=run)
    logging.getLogger("imgtrain.test").debug("below the file's level")
    assert not run.exists()  # a command that fails before logging leaves no half-made run directory
    logging.getLogger("imgtrain.test").info("first line")
    lines = (run / "logs" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first line"]
