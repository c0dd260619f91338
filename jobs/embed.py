"""python jobs/embed.py --config jobs/presets/embed_demo.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/embed.py ...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
