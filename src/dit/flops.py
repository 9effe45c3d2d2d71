"""`python -m dit.flops`: the command of dit.models.flops (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.models.flops import main

if __name__ == "__main__":
    exit_on_usage_error(main)
