"""`python -m dit.export`: the command of dit.tools.export (its --help says what it does)."""

from dit.errors import exit_on_usage_error
from dit.tools.export import main

if __name__ == "__main__":
    exit_on_usage_error(main)
