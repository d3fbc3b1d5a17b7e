"""Env throughput benchmark: same as ``rl-pg bench``.

python experiments/env_throughput.py --out DIR [--num-envs 1,64,1024,16384,65536]
"""

import sys

from rl_pg.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
