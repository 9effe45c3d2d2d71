"""`python -m dit.benchmark`: the command of dit.tools.benchmark (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.tools.benchmark import main

if __name__ == "__main__":
    exit_on_usage_error(main)
