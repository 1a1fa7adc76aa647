"""`ray job submit ... -- python jobs/run_pipeline.py --config jobs/configs/<name>.yaml [key=value ...]`

A thin entry point over `edsft run`; everything else lives in the package.
"""

import sys

from edsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
