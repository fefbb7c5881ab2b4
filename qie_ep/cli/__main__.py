"""`python -m qie_ep.cli` = the `qie` command."""
import sys

from qie_ep.cli import main

if __name__ == "__main__":
    sys.exit(main())
