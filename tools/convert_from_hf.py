#!/usr/bin/env python
"""Convert a Hugging Face Llama directory to a megatron_align checkpoint + train.yaml.

Same as `megatron-align convert from-hf ...`; the logic lives in megatron_align/convert/. Run with --help for options.
"""

import sys

from megatron_align.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "from-hf", *sys.argv[1:]]))
