"""A model replica inside the ingress's own process, called as if through a handle.

Why: every hop between Serve processes costs a ResNet-sized request milliseconds of
serialising and scheduling (docs/benchmarks.md §12: 16.6 ms end to end over gRPC for
1 ms of GPU work, two hops: proxy to ingress, ingress to model replica). With
``args.embed`` naming a model or a group, the ingress replica builds that replica's
object itself (the same ``ModelDeployment``/``GroupDeployment`` class, not a Serve
deployment) and calls it directly: no hop between ingress and engine, and with Serve's
direct ingress none at all. The ingress's code is unchanged: it sees a handle.

``LocalHandle`` answers what the ingress uses of ``DeploymentHandle``:
``handle.<method>.remote(*args)`` returns an awaitable, and ``handle.options(...)``
accepts ``multiplexed_model_id`` (a group's model, given to the group through
:func:`local_model_id`, since Serve's request context here is the ingress's) and
ignores Serve's transport options, which mean nothing in one process.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable
from typing import Any

#: The model a local call to a group is for; Serve's ``get_multiplexed_model_id()``
#: holds the ingress request's (empty) id in an embedding ingress.
_MODEL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("ebb_local_model_id", default=None)

#: ``handle.options`` keys that choose Serve's transport or routing; in one process they
#: have nothing to choose, so they are accepted and have no effect.
_TRANSPORT_OPTIONS = frozenset({"_by_reference", "stream", "method_name", "use_new_handle_api"})


def local_model_id() -> str | None:
    """The model a local (embedded) call to a group names; None for a call through Serve."""
    return _MODEL_ID.get()


class LocalHandle:
    """Handle-shaped access to a replica object living in this process."""

    def __init__(self, target: Any, model_id: str | None = None) -> None:
        self._target = target
        self._model_id = model_id

    def options(self, *, multiplexed_model_id: str | None = None, **others: Any) -> LocalHandle:
        unknown = sorted(set(others) - _TRANSPORT_OPTIONS)
        if unknown:
            raise TypeError(f"LocalHandle.options: unsupported option(s) {unknown}; an embedded replica "
                            f"takes multiplexed_model_id and ignores {sorted(_TRANSPORT_OPTIONS)}")
        return LocalHandle(self._target, multiplexed_model_id if multiplexed_model_id is not None else self._model_id)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._target, name)
        if not callable(method):
            raise AttributeError(f"{type(self._target).__name__}.{name} is not a method")
        return _LocalMethod(method, self._model_id)

    @property
    def target(self) -> Any:
        """The replica object itself (for Serve's hooks the ingress passes on)."""
        return self._target


class _LocalMethod:
    def __init__(self, method: Any, model_id: str | None) -> None:
        self._method = method
        self._model_id = model_id

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._call(*args, **kwargs)

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        # Set inside the coroutine, so the id belongs to this call's context only (each
        # awaiting task runs its coroutine in its own copy of the context).
        token = _MODEL_ID.set(self._model_id)
        try:
            result = self._method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        finally:
            _MODEL_ID.reset(token)


def build_embedded(spec: dict[str, Any]) -> LocalHandle:
    """The replica object ``spec`` describes (``deployments.app.bind``'s ``embedded``:
    ``{"name", "cls", "args", "models"}``), built in this process.

    ``cls`` is the class behind Serve's ``ModelDeployment``/``GroupDeployment`` (its
    start, GPU thread, coordinator client, batching), run here instead of in a replica of
    its own. It needs the ingress replica's GPU: without one the engine would quietly run
    on the CPU, so that is refused, with what to set."""
    from deployments.config import ConfigError

    wants_gpu = [m["name"] for m in spec["models"] if str(m.get("device", "auto")) != "cpu"]
    if wants_gpu and not _replica_has_gpu():
        raise ConfigError(
            f"args.embed: {spec['name']!r} runs inside EbbIngress, whose replicas were given no GPU; set "
            f"ray_actor_options.num_gpus on EbbIngress's deployments entry (as its own deployment had), or "
            f"device: cpu on {wants_gpu}")
    return LocalHandle(spec["cls"](*spec["args"]))


def _replica_has_gpu() -> bool:
    import ray

    try:
        return bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
    except Exception:  # noqa: BLE001 - outside a Ray worker (unit tests): nothing to check against
        return True
