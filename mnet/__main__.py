"""`python -m mnet` (and `torchrun -m mnet`) runs the CLI."""

from mnet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
