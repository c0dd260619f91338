"""python jobs/elevater.py --config jobs/presets/elevater_laion.yaml [key.sub=value ...]

The same file runs locally and under `ray job submit --working-dir . -- python jobs/elevater.py
...`.
"""

import sys

from react_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["elevater", *sys.argv[1:]]))
