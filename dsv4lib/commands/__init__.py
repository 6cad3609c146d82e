"""One module per CLI subcommand (see dsv4lib/cli.py)."""
