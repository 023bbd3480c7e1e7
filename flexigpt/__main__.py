"""``python -m flexigpt``: see ``flexigpt.cli``."""
import sys

from flexigpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
