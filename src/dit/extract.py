"""`python -m dit.extract`: the command of dit.tools.extract (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.tools.extract import main

if __name__ == "__main__":
    exit_on_usage_error(main)
