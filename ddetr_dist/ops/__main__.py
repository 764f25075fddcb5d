"""`python -m ddetr_dist.ops --check [--device cpu|cuda]`: build the MSDA op, run it once
against the reference, exit 1 with the reason if it cannot be used (see build.py).

The entry is here, not in build.py: `python -m ddetr_dist.ops.build` imports the package
first, which imports build, and runpy then warns that it runs a second copy of a module
already in sys.modules.
"""
import sys

from ddetr_dist.ops.build import main

sys.exit(main())
