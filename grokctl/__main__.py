"""`python -m grokctl`: the `grokctl` command (Ctrl-C during start-up: one line, exit 130)."""

from grokctl.cli import entry

entry()
