"""Training entry point (SPEC §4). Not built yet: the training issue fills this in."""
import sys

if __name__ == "__main__":
    sys.exit("train.py is a placeholder: training is not implemented yet (see the training issue).")
