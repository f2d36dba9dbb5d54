"""The command line, `graphcost <verb> MODEL [options]`: main.py assembles the parser from one
module per verb (each `add_parser` + `run`) and the shared option parents (options.py); a verb
calls graphcost.api and prints a report, or with --json its result's `to_dict()`."""
