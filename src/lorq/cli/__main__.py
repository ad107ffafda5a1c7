"""``python -m lorq.cli …``: the entry point for launchers (``accelerate launch``, ``torchrun``)."""

from lorq.cli import main

main()
