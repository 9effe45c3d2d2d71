"""The run folder explains itself: the config tree (config_tree.log) and a log file that holds
what the run printed and what Lightning logged (dit.training.run_log)."""

import io
import logging
import os
import sys

from conftest import quick_cfg
from omegaconf import OmegaConf

from dit.training.run_log import ConsoleGuard, LogCopy, RunLog, config_tree, guard_console


def test_a_log_copy_keeps_printed_lines_and_leaves_progress_bars_on_the_console():
    console, file = io.StringIO(), io.StringIO()
    copy = LogCopy(console, file)
    written = [
        "bar  10%\rbar  50%\rbar 100%\n",  # a progress bar's redraws and its last state
        "\x1b[1mbold\x1b[0m and ",  # a colour code, a line written in two parts
        "more\n",
        "\router 1/3\n\rinner 5/50\x1b[A\router 1/3\n",  # a bar beneath another: down, draw, up
        "\r          \r",  # a bar cleared on close (leave=False) ...
        "step 3: FID 4.2\n",  # ... and a line printed after it
        "windows line\r\n",
        "last without newline",
    ]
    for text in written:
        copy.write(text)
    assert console.getvalue() == "".join(written)
    assert file.getvalue() == "bold and more\nstep 3: FID 4.2\nwindows line\n"
    assert copy.writable() and copy.getvalue() == console.getvalue()  # the rest is the console's own


def test_a_console_closed_under_the_run_goes_to_devnull_and_the_log_keeps_every_line(monkeypatch, capfd):
    """`train.py | head`: the reader stops, the pipe breaks; the run must go on training. What a run
    prints (a LogCopy over the guard) and what a logging handler made before (Lightning's) writes."""
    read_end, write_end = os.pipe()
    console = io.TextIOWrapper(os.fdopen(write_end, "wb"), line_buffering=True)
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after guard_console replaces it
    logger = logging.getLogger("a_library")
    handler = logging.StreamHandler(console)
    logger.addHandler(handler)
    try:
        guard_console()
        assert isinstance(sys.stdout, ConsoleGuard) and handler.stream is sys.stdout
        file = io.StringIO()
        copy = LogCopy(sys.stdout, file)
        copy.write("first line\n")
        assert os.read(read_end, 100) == b"first line\n"
        os.close(read_end)  # the reader stops
        copy.write("second line\n")  # the pipe breaks here: no BrokenPipeError reaches the run
        logger.warning("a library's message")  # nor a "--- Logging error ---" report
        copy.write("third line\n")
        copy.flush()
        assert file.getvalue() == "first line\nsecond line\nthird line\n"
        assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull)  # the descriptor, too
        assert "Logging error" not in capfd.readouterr().err
    finally:
        logger.removeHandler(handler)
        console.close()


def test_the_config_tree_is_resolved_plain_text_with_a_branch_per_section(tmp_path):
    cfg = OmegaConf.create({"data": {"latent_size": 8}, "model": {"input_size": "${data.latent_size}"}, "seed": 3})
    config_tree(cfg, tmp_path / "config_tree.log", show=False)
    text = (tmp_path / "config_tree.log").read_text()
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0] == "config" and lines[1].endswith("model") and lines[3].endswith("data")  # model first
    assert "input_size: 8" in text and "${" not in text and lines[-1].endswith("3")


def test_a_run_log_takes_prints_and_lightning_messages_and_then_lets_go(tmp_path, capsys, monkeypatch):
    lightning = logging.getLogger("lightning.pytorch")
    # as in train.py: Lightning was imported before Hydra set up logging, so it does not propagate
    monkeypatch.setattr(lightning, "propagate", False)
    handlers, stdout = list(lightning.handlers), sys.stdout
    with RunLog(tmp_path) as log:
        print("printed")
        print("to stderr", file=sys.stderr)
        lightning.info("from lightning")
    print("after the run")
    assert log.path == tmp_path / "train.log"
    text = log.path.read_text()
    assert "printed\n" in text and "to stderr\n" in text
    assert "][lightning.pytorch][INFO] - from lightning" in text
    assert "after the run" not in text
    assert sys.stdout is stdout and lightning.handlers == handlers
    assert "printed" in capsys.readouterr().out  # the console still shows it


def test_a_run_prints_and_saves_its_tree_its_folder_and_its_model(tmp_path, digits_dir, capsys):
    import train

    out = tmp_path / "run"
    cfg = quick_cfg(
        out, digits_dir, "trainer.max_steps=2", "trainer.val_check_interval=2", "~callbacks.digits_accuracy"
    )
    train.main(cfg)
    console = capsys.readouterr().out
    log = (out / "train.log").read_text()
    tree = (out / "config_tree.log").read_text()
    assert tree.startswith("config\n") and "_target_: dit.models.DiT" in tree
    for text in (console, log):
        assert "run folder: " + str(out) in text
        assert f"checkpoints:  {out / 'checkpoints'}" in text
        assert "DiT-d4w128/2 (adaln_zero, 16 tokens): 1.27M parameters" in text
        assert "_target_: dit.models.DiT" in text  # the tree
        assert "Trainable params" in text  # Lightning's model summary
    assert log.count("run folder: ") == 1 and log.count("Trainable params") == 1


def test_print_config_false_keeps_the_tree_in_the_folder_only(tmp_path, digits_dir, capsys):
    import train

    out = tmp_path / "run"
    cfg = quick_cfg(out, digits_dir, "trainer.max_steps=1", "~callbacks.digits_accuracy", "print_config=false")
    train.main(cfg)
    assert "_target_: dit.models.DiT" not in capsys.readouterr().out
    assert "_target_: dit.models.DiT" in (out / "config_tree.log").read_text()


def test_a_crash_leaves_its_traceback_in_the_run_log(tmp_path):
    try:
        with RunLog(tmp_path):
            raise RuntimeError("the loader died")
    except RuntimeError:
        pass
    text = (tmp_path / "train.log").read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: the loader died" in text
