"""``python -m unimm.cli`` (what ``accelerate launch -m unimm.cli`` and ``torchrun -m unimm.cli`` run)."""

from unimm.cli import main

main()
