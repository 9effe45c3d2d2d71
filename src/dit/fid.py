"""`python -m dit.fid`: the command of dit.evaluation.fid (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.evaluation.fid import main

if __name__ == "__main__":
    exit_on_usage_error(main)
