"""SemiSAM-O1 Label command line: ``python main.py --help``."""

import sys
from pathlib import Path

# this checkout's library first, even where another checkout is the installed (editable) one
sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))

from semisam_o1.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
