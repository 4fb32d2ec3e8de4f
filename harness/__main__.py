"""`python -m merge_harness` runs the CLI."""

from merge_harness.cli.app import app

app()
