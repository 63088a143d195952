"""The training engine under train.py's command line: loss, model averaging, and the pieces the loop is built from."""
