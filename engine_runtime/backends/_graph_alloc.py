"""PyTorch's pluggable-allocator hook pointed at a VMM arena (``_arena_alloc.c``).

The C source is compiled on first use with the host's C compiler and cached; where
no compiler exists, ``load()`` returns None and the PyTorch backend falls back to
eager execution with ``empty_cache()`` (``ContextMechanism.TORCH_EMPTY_CACHE``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_arena_alloc.c")

#: Captures set the allocator's single global range, so they run one at a time per process.
capture_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("EBB_CACHE_DIR", Path.home() / ".cache" / "ebb"))


class ArenaAllocatorLib:
    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.ebb_arena_set.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        self.lib.ebb_arena_high.restype = ctypes.c_size_t
        self.allocator = torch.cuda.memory.CUDAPluggableAllocator(str(path), "ebb_arena_alloc", "ebb_arena_free")

    def set_range(self, base: int, size: int) -> None:
        self.lib.ebb_arena_set(base, size)

    def high_water(self) -> int:
        return int(self.lib.ebb_arena_high())


@functools.cache
def load() -> ArenaAllocatorLib | None:
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"arena_alloc-{digest}.so"
    if not target.exists():
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            logger.warning("no C compiler found: CUDA-graph arena disabled, dynamic mode falls back to empty_cache")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            result = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(_SOURCE)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("compiling the arena allocator failed (%s); falling back to empty_cache",
                               result.stderr.strip())
                return None
            os.replace(out, target)  # atomic: concurrent replicas never load a half-written file
    return ArenaAllocatorLib(target)
