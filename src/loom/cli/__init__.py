"""The ``loom`` command: a thin Typer shell over the library."""
