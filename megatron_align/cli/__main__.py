"""`python -m megatron_align.cli VERB ...`: the same as the `megatron-align` command."""

import sys

from megatron_align.cli import main

sys.exit(main())
