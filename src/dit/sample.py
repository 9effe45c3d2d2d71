"""`python -m dit.sample`: the command of dit.evaluation.sample (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.evaluation.sample import main

if __name__ == "__main__":
    exit_on_usage_error(main)
