"""`python -m dit.plots`: the command of dit.evaluation.plots (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.evaluation.plots import main

if __name__ == "__main__":
    exit_on_usage_error(main)
