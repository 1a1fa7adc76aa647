"""`ray job submit ... -- python jobs/train_sft.py --config jobs/configs/<name>.yaml [key=value ...]`

A thin entry point over `edsft train`; everything else lives in the package.
"""

import sys

from edsft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
