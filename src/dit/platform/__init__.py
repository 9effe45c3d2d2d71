"""Hardware paths (torch_xla) and the private library names this project uses (compat.py)."""
