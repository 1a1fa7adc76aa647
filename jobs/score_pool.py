"""`ray job submit ... -- python jobs/score_pool.py --config jobs/configs/<name>.yaml [key=value ...]`

A thin entry point over `edsft score`; everything else lives in the package.
"""

import sys

from edsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
