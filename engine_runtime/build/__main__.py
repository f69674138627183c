"""``python -m engine_runtime.build``: build (or fetch from the cache) a TensorRT engine."""

import sys

from engine_runtime.build.cli import main

sys.exit(main())
