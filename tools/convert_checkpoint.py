#!/usr/bin/env python
"""Convert a D-iGPT pretraining checkpoint into a timm classifier state dict or the release's single state dict;
``--help`` for the options. The code is ``digpt_xla.convert``."""

import sys

from digpt_xla.convert import main

if __name__ == "__main__":
    sys.exit(main())
