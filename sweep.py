#!/usr/bin/env python
"""W&B sweeps over run.py's Hydra overrides, on the W&B server or locally: ``python sweep.py SPEC [--local]``.

The command lives in :mod:`fidmed.sweep` (``python sweep.py --help`` describes it); this file only starts it, with
the run.py beside it as the program each local trial runs.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    from fidmed.sweep import main

    sys.exit(main(run_script=Path(__file__).resolve().parent / "run.py"))
