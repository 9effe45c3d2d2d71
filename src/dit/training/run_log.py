"""What a run folder tells about its run: the resolved config as a tree (`config_tree.log`, as
lightning-hydra-template's `print_config_tree`) and a log file that holds everything the run
printed, not only what went through `logging`.

Hydra's job logging writes `<run>/train.log` from Python's `logging`; `print` (resume decisions,
FID lines, the sample summary) and Lightning's own messages bypass it: Lightning gives its logger a
console handler of its own and stops propagation when the root logger has no handler at import time
(lightning/pytorch/__init__.py and lightning/fabric/__init__.py, checked in 2.6.6), and train.py
imports Lightning before Hydra configures logging.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from dit.errors import point_at_devnull

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
CURSOR_UP = "\x1b[A"  # tqdm's move back up to a bar above, after drawing one beneath it
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours and the cursor moves of nested progress bars

# The config's first sections in the tree; the others follow in the config's own order.
TREE_ORDER = ("model", "data", "module", "trainer", "callbacks", "logger", "paths")


def config_tree(cfg: DictConfig, path: Path | None = None, show: bool = True) -> rich.tree.Tree:
    """The resolved config as a tree: one branch per top-level section, its YAML beneath; printed
    (`show`), and saved as plain text to `path` (the run's config_tree.log)."""
    tree = rich.tree.Tree("config", style="bold", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(rich.syntax.Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    if show:
        rich.print(tree)
    if path is not None:
        with open(path, "w") as file:
            rich.print(tree, file=file)  # a file is no terminal: rich writes no colour codes
    return tree


class ConsoleGuard(io.TextIOBase):
    """A run's stdout or stderr whose reader may go away (`train.py | head`: the pipe breaks). A closed
    console must not end the run: from the first broken write on, output goes to devnull, file
    descriptor included (child processes' writes), and the run's log file still gets every line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            self.stream.write(text)
        except BrokenPipeError:
            self.to_devnull()
        return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.to_devnull()

    def to_devnull(self):
        self.stream = point_at_devnull(self.stream)

    def writable(self):
        return True

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name):
        if name == "stream":  # not set yet
            raise AttributeError(name)
        return getattr(self.stream, name)


class LogCopy(ConsoleGuard):
    """A console stream (stdout or stderr) that also appends what is written to a log file, line by
    line. Progress bars stay on the console only: a bar redraws its line after a carriage return,
    and a bar beneath another moves the cursor up ('\x1b[A'); a line that does either is not kept.
    What is written straight to the file descriptor (`fileno()`: child processes) bypasses the copy."""

    def __init__(self, stream, file):
        super().__init__(stream)
        self.file, self.line, self.redraw = file, "", False

    def write(self, text):
        super().write(text)
        if self.file.closed:  # kept by an object after the run let go of the console
            return len(text)
        for piece in re.split(r"(\n)", text.replace("\r\n", "\n")):
            if piece == "\n":
                line = ANSI_ESCAPE.sub("", self.line).rstrip()
                if line and not self.redraw:
                    self.file.write(line + "\n")
                self.line, self.redraw = "", False
            elif "\r" in piece:
                self.line, self.redraw = piece.rsplit("\r", 1)[-1], True
            elif piece:
                self.redraw = (self.redraw and bool(self.line)) or CURSOR_UP in piece
                self.line += piece
        self.file.flush()
        return len(text)


def guard_console() -> None:
    """sys.stdout and sys.stderr as ConsoleGuards, and the logging handlers already writing to them
    (Lightning's, made at its import) pointed at the guards; handlers made later (Hydra's job
    logging: ext://sys.stdout) take the guards themselves."""
    guards = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, ConsoleGuard):
            guards[id(stream)] = guard = ConsoleGuard(stream)
            setattr(sys, name, guard)
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler and id(handler.stream) in guards:
                handler.setStream(guards[id(handler.stream)])


def log_file_path(out: Path) -> Path:
    """The file in the run folder that Hydra's job logging writes (a FileHandler of the root logger,
    <run>/<job name>.log), or <run>/train.log."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == Path(out).absolute():
            return Path(handler.baseFilename)
    return Path(out) / "train.log"


class RunLog:
    """While open: print output and Lightning's log messages also go to the run's log file."""

    def __init__(self, out: Path):
        self.path = log_file_path(out)
        self.handlers = []

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        # a resumed or refused launch appends to the same file: where each launch starts
        self.file.write(
            f"---- launch at {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}: {' '.join(sys.argv)}\n"
        )
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = LogCopy(sys.stdout, self.file), LogCopy(sys.stderr, self.file)
        handler = logging.FileHandler(self.path)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            if not logger.propagate:  # its messages never reach the root logger's file
                logger.addHandler(handler)
                self.handlers.append((logger, handler))
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and not issubclass(kind, SystemExit):
            # the crash's traceback: Hydra prints it to the console after this has let go of it
            self.file.write("".join(traceback.format_exception(kind, error, trace)))
        for logger, handler in self.handlers:
            logger.removeHandler(handler)
            handler.close()
        for copy in (sys.stdout, sys.stderr):
            if isinstance(copy, LogCopy) and copy.line.strip() and not copy.redraw:
                copy.write("\n")  # a last line printed without its newline
        sys.stdout, sys.stderr = self.streams
        self.file.close()
        return False
