"""`ray job submit ... -- python jobs/select_subset.py --config jobs/configs/<name>.yaml [key=value ...]`

A thin entry point over `edsft select`; everything else lives in the package.
"""

import sys

from edsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
