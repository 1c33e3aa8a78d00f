"""SemiSAM-O1 Label command line: ``python main.py --help``."""

import sys

from semisam_o1.cli import main

if __name__ == "__main__":
    sys.exit(main())
