"""``python -m engine_runtime.memory.pool``: run one GPU's pool owner."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from engine_runtime.errors import PoolUnavailableError
from engine_runtime.memory.pool._wire import (DEFAULT_CHUNK_BYTES, PoolPaths)
from engine_runtime.memory.pool.support import _bind_device
from engine_runtime.memory.pool.owner import ContextPool

logger = logging.getLogger(__name__)


# --- the owner process ------------------------------------------------------------------


def _device_of(gpu_uuid: str) -> int:
    from engine_runtime import _cuda

    err, count = _cuda.runtime().cudaGetDeviceCount()
    if int(err) != 0:
        raise PoolUnavailableError(f"cudaGetDeviceCount failed ({err})", gpu_uuid)
    seen = [_cuda.device_uuid(i) for i in range(count)]
    if gpu_uuid not in seen:
        raise PoolUnavailableError(f"GPU not visible here; visible: {seen}", gpu_uuid)
    return seen.index(gpu_uuid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Own one GPU's context-memory pool and serve it to replicas.")
    parser.add_argument("--gpu-uuid", required=True, help="GPU-xxxxxxxx-... as NVML prints it")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--initial-chunks", type=int, default=0)
    parser.add_argument("--max-chunks", type=int, default=None, help="table slots (default: card memory / chunk)")
    parser.add_argument("--directory", default=None, help="where the socket, table and log live")
    parser.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long with no replica")
    parser.add_argument("--detach", action="store_true", help="double-fork into a daemon first")
    args = parser.parse_args(argv)
    if args.detach:
        # Fork before touching CUDA (a CUDA context does not survive fork); the launcher
        # exits at once so its parent can reap it; the daemon leads a new session.
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s pool[{os.getpid()}] %(levelname)s %(message)s")
    paths = PoolPaths.for_gpu(args.gpu_uuid, args.directory)
    try:
        device = _device_of(args.gpu_uuid)
        from engine_runtime import _cuda

        _bind_device(_cuda, device)
        with _cuda.device(device):
            pool = ContextPool(device, args.gpu_uuid, args.chunk_bytes, args.initial_chunks, paths.socket,
                               table_path=paths.table, max_chunks=args.max_chunks, idle_exit_s=args.idle_exit_s)
            with pool:
                signal.signal(signal.SIGTERM, lambda *_: pool.stop())
                signal.signal(signal.SIGINT, lambda *_: pool.stop())
                pool.serve_forever()
    except PoolUnavailableError as err:
        logger.error("%s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
