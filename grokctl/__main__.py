from grokctl.cli.app import run

run()
