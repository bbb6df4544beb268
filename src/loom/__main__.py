"""``python -m loom`` (also what ``accelerate launch -m loom train …`` runs)."""

from loom.cli.main import main

main()
