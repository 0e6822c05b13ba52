#!/usr/bin/env python
"""Convert a megatron_align checkpoint (any TP/PP layout) to a Hugging Face LlamaForCausalLM directory.

Same as `megatron-align convert to-hf ...`; the logic lives in megatron_align/convert/. Run with --help for options.
"""

import sys

from megatron_align.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
