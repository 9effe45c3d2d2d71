"""`python -m dit.fid50k`: the command of dit.evaluation.fid50k (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.evaluation.fid50k import main

if __name__ == "__main__":
    exit_on_usage_error(main)
