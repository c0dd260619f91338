"""python jobs/generate.py --config jobs/presets/generate_demo.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/generate.py
...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
