"""`ray job submit ... -- python jobs/sweep.py --config jobs/configs/<name>.yaml [key=value ...]`

A thin entry point over `edsft sweep`; everything else lives in the package.
"""

import sys

from edsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
