"""The engine cache: plans on disk under a key of everything that goes into a build.

The key (:func:`cache_key`) covers model content (:func:`onnx_digest`,
:func:`module_digest`), profiles, precision, TensorRT flavour and version, target and
this package's ``BUILDER_REVISION``, so a second build of the same thing is a file read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_runtime.build.precision import Precision
from engine_runtime.spec import ShapeProfile

logger = logging.getLogger(__name__)


#: Bumped when this module changes what it puts into a plan for the same inputs.
BUILDER_REVISION = 1


@dataclass(frozen=True)
class BuildResult:
    """A built (or cached) plan and how it came to be."""

    plan: bytes
    key: str
    cache_hit: bool
    build_s: float
    #: Where the plan lies on disk (the cache entry), or None without a cache.
    path: Path | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


def cache_key(model_digest: str, profiles: Mapping[str, ShapeProfile], precision: Precision,
              tensorrt_tag: str, target: str, refittable: bool = False) -> str:
    """A stable name for a plan: any change to what goes into the build changes it."""
    doc = {
        "model": model_digest,
        "profiles": {k: profiles[k].to_dict() for k in sorted(profiles)},
        "precision": precision.value,
        "tensorrt": tensorrt_tag,
        "target": target,
        "builder": BUILDER_REVISION,
    }
    if refittable:
        # Only when set, so plans cached before the option existed keep their keys.
        doc["refittable"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def onnx_digest(onnx_bytes: bytes) -> str:
    return "onnx:" + hashlib.sha256(onnx_bytes).hexdigest()


def module_digest(module: Any, *, input_name: str, input_dtype: str, output_name: str) -> str:
    """Content of a module: its class source, structure and every parameter and buffer.

    Hashing this instead of the exported ONNX lets a cache hit skip the export (seconds).
    The torch version is part of it because the exporter's output follows it.
    """
    import torch

    h = hashlib.sha256()
    cls = type(module)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # classes made at run time have no source file
        source = f"{cls.__module__}.{cls.__qualname__}"
    for part in (source, repr(module), input_name, input_dtype, output_name, torch.__version__):
        h.update(part.encode())
        h.update(b"\0")
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "module:" + h.hexdigest()


class EngineCache:
    """Plans on disk as ``<key>.plan`` with a ``<key>.json`` beside it; writes are atomic."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def plan_path(self, key: str) -> Path:
        return self.root / f"{key}.plan"

    def get(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        plan_path, meta_path = self.plan_path(key), self.root / f"{key}.json"
        try:
            plan = plan_path.read_bytes()
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("plan_sha256") != hashlib.sha256(plan).hexdigest():
            # A torn or tampered entry: rebuild rather than hand TensorRT a bad plan.
            logger.warning("engine cache entry %s does not match its checksum; rebuilding", plan_path)
            return None
        return plan, meta

    def put(self, key: str, plan: bytes, meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "plan_sha256": hashlib.sha256(plan).hexdigest(), "plan_bytes": len(plan)}
        path = self.plan_path(key)
        # Plan first, metadata second: an entry without (matching) metadata is a miss.
        _write_atomic(path, plan)
        _write_atomic(self.root / f"{key}.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return path


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
