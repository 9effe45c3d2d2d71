"""`python -m dit.posthoc_ema`: the command of dit.tools.posthoc_ema (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.tools.posthoc_ema import main

if __name__ == "__main__":
    exit_on_usage_error(main)
