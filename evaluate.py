"""Evaluation entry point (SPEC §5). Not built yet: the evaluation issue fills this in."""
import sys

if __name__ == "__main__":
    sys.exit("evaluate.py is a placeholder: evaluation is not implemented yet "
             "(see the evaluation issue).")
