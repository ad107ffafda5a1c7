"""``python -m lorq …``: the command line."""

from lorq.cli import main

main()
