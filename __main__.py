"""`python -m triton_rerank`: the same as the `triton-rerank` command."""

import sys

from .cli import main

sys.exit(main())
