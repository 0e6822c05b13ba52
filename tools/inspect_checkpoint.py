#!/usr/bin/env python
"""Show what a megatron_align checkpoint holds (step, layout, data fingerprint, config, tensors).

Same as `megatron-align checkpoint inspect ...`; the logic lives in megatron_align/convert/.
Run with --help for options.
"""

import sys

from megatron_align.cli import main

if __name__ == "__main__":
    sys.exit(main(["checkpoint", "inspect", *sys.argv[1:]]))
