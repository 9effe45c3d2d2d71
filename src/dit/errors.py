"""Bad input gets one line that names the key or argument and the fix, never a traceback.

The project's own checks raise `UsageError`; `train.py` and every `python -m dit.<tool>` print it
(and the file errors that name their path) as `error: <message>` and exit with code 2. Any other
exception is a bug and keeps its traceback.
"""

import argparse
import os
import sys


class UsageError(ValueError):
    """A value the user gave (a config key, an argument, a file) cannot work; the message says
    which and what to do instead."""


# File errors carry their path in the message ("[Errno 2] No such file or directory: 'x'").
ONE_LINE_ERRORS = (
    UsageError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)
USAGE_EXIT_CODE = 2  # as argparse's own usage errors


def number(key: str, value) -> float:
    """A config value that must be a number, as a float; anything else is one UsageError naming `key`."""
    if isinstance(value, bool):
        raise UsageError(f"{key}={value!r}; give a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r}; give a number") from None


def exit_with_one_line(message) -> None:
    """The end of a command refused for bad input: `error: <message>` on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def point_at_devnull(stream):
    """After a console's reader went away (`| head`: the pipe broke): the stream's file descriptor
    onto devnull, so that later writes to it, buffered or from child processes, go nowhere quietly;
    returns devnull, open for writing, to write to instead."""
    devnull = open(os.devnull, "w")
    try:
        os.dup2(devnull.fileno(), stream.fileno())
    except (OSError, ValueError):  # a stream with no descriptor of its own
        pass
    return devnull


def exit_on_usage_error(main):
    """Run a tool's `main()`; a usage error ends it with one line on stderr. Output piped into a
    reader that stops early (`| head`) ends it quietly, as the Python docs advise for SIGPIPE
    (library/signal.html, "Note on SIGPIPE"): stdout pointed at devnull, exit 1."""
    try:
        result = main()
        sys.stdout.flush()  # a closed pipe shows here at the latest, inside the try
        return result
    except ONE_LINE_ERRORS as err:
        exit_with_one_line(err)
    except BrokenPipeError:
        point_at_devnull(sys.stdout)
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an argument missing, unknown or malformed) are UsageErrors:
    one line, as every other bad input of the tools, rather than a usage block and a message."""

    def error(self, message):
        raise UsageError(f"{message} (--help lists the arguments)")
