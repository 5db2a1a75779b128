"""``python -m srupp ...`` (and ``torchrun -m srupp train ...``)."""

from srupp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
