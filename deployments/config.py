"""The ``args`` of Ebb's application in ``cluster.yaml``, validated once, at the edge.

Serve passes ``applications[].args`` to ``deployments.app:build_app``; everything in
it is parsed here with pydantic models that reject unknown keys, so a misspelled key
fails at deploy time with its path (``models.0.sorce: Extra inputs are not
permitted``). Per-deployment options (``num_replicas``, ``ray_actor_options``,
``autoscaling_config``, ``max_ongoing_requests``, ``user_config``) are not here:
they stay under the application's ``deployments:`` list, where Serve expects them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine_runtime.errors import EbbError
from engine_runtime.memory.pool import DEFAULT_CHUNK_BYTES

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(EbbError, ValueError):
    """The application's args are invalid; the message names each bad key's path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureSource(_Strict):
    """A built-in (or torchvision) architecture with fixed random weights."""

    architecture: str = Field(description="resnet18/34/50/101/152, bert-base, bert-tiny, pool-linear (ResNet's "
                                          "input and output, almost no compute: for measuring the serving path), "
                                          "or a torchvision name")
    seed: int = Field(0, description="Seed for the random weights, so every replica answers the same.")


class PlanSource(_Strict):
    """A serialized TensorRT engine (plan). Plans are native code: load only trusted ones."""

    plan: str = Field(description="Path of the .plan/.engine file, inside one of model_dirs.")


class OnnxSource(_Strict):
    """An ONNX file, built into a TensorRT engine (cached) at replica start."""

    onnx: str = Field(description="Path of the .onnx file, inside one of model_dirs.")


Source = Union[ArchitectureSource, PlanSource, OnnxSource]


class InputProfile(_Strict):
    """The optimisation profile: batch range and the per-sample shape."""

    min_batch: int = Field(1, ge=1, description="Smallest batch an engine is built for.")
    opt_batch: int | None = Field(None, ge=1, description="Batch the engine is tuned for (default max_batch).")
    max_batch: int = Field(8, ge=1, le=4096, description="Largest batch; requests over it get HTTP 400.")
    image_size: int = Field(224, ge=16, le=4096, description="Image side for vision architectures.")
    seq_len: int = Field(128, ge=1, le=8192, description="Sequence length for encoder architectures.")

    @model_validator(mode="after")
    def _order(self) -> InputProfile:
        opt = self.opt_batch or self.max_batch
        if not self.min_batch <= opt <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}/{opt}/{self.max_batch}")
        return self


class BatchingConfig(_Strict):
    """Dynamic batching (``deployments.batcher``: Triton's rule, the next batch forms when
    the engine is free), capped by the profile's max batch."""

    max_batch_size: int = Field(8, ge=1, description="Requests merged into one engine call, at most.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="How long the oldest request waits for "
                                                                        "more to fill a batch (Triton's "
                                                                        "max_queue_delay); 0: never waits.")


class ModelConfig(_Strict):
    """One model: one Serve deployment whose replicas each hold one engine."""

    name: Annotated[str, Field(pattern=_NAME, description="Model name: the deployment name and the URL path.")]
    source: Source = Field(description="Where the engine comes from: architecture, plan or onnx.")
    input: InputProfile = Field(default_factory=InputProfile, description="Input profile.")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Engine precision.")
    backend: Literal["auto", "pytorch", "tensorrt"] = Field(
        "auto", description="auto: TensorRT for plan/onnx sources when installed, else PyTorch.")
    mode: Literal["static", "dynamic"] = Field("dynamic", description="Initial memory mode.")
    pin: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto lets the coordinator move the replica; static/dynamic pins it.")
    lazy: bool = Field(True, description="Load the engine on the first call instead of at replica start.")
    device: str = Field("auto", description="auto, cpu, or cuda[:N]; auto uses the replica's GPU if it has one.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    reject_non_finite: bool = Field(True, description="Refuse inputs with NaN or infinities (HTTP 400).")
    group: str | None = Field(None, pattern=_NAME, description="The group (args.groups) whose replicas serve this "
                              "model beside the group's other models; None: the model's own deployment.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if isinstance(self.source, ArchitectureSource) and self.backend == "tensorrt":
            raise ValueError("backend 'tensorrt' needs a plan or onnx source; use 'ebb build' to make a plan")
        if isinstance(self.source, PlanSource) and self.backend == "pytorch":
            raise ValueError("a TensorRT plan cannot run on the pytorch backend")
        if isinstance(self.source, OnnxSource) and self.backend == "pytorch":
            # Refused here, at deploy, rather than by every replica's start (Serve retried
            # three times and reported the error inside a traceback).
            raise ValueError("an ONNX source is built into a TensorRT engine: set backend 'tensorrt' or "
                             "'auto' (the pytorch backend serves architectures only)")
        return self


class CoordinatorConfig(_Strict):
    """The coordinator's policy: when replicas move between static and dynamic mode."""

    high_watermark: float = Field(0.90, gt=0, le=1, description="Above this share of a GPU in use, free memory.")
    low_watermark: float = Field(0.75, gt=0, le=1, description="Below this share, give memory back to speed.")
    target: float = Field(0.85, gt=0, le=1, description="Share of the GPU to bring use to when acting.")
    poll_interval_s: float = Field(0.5, gt=0, le=60, description="How often replicas report and decisions are made.")
    min_dwell_s: float = Field(5.0, ge=0, description="A replica keeps a mode at least this long (no flapping).")
    admission_deadline_s: float = Field(5.0, gt=0, description="How long a call waits for context memory before 503.")
    virtual_gpu_memory_bytes: int = Field(
        16 * 2**30, gt=0, description="Size of each logical GPU on hosts without a real one.")
    history_size: int = Field(256, ge=1, description="Decisions kept for the status view.")
    namespace: str = Field("ebb", pattern=_NAME, description="Ray namespace of the coordinator actor.")
    orphan_exit_s: float = Field(
        60.0, gt=0, description="The coordinator exits once no replica has reported for this long (its "
                                "application is gone); the next replica to start makes a new one.")

    @model_validator(mode="after")
    def _order(self) -> CoordinatorConfig:
        if not self.low_watermark <= self.target <= self.high_watermark:
            raise ValueError(f"need low_watermark <= target <= high_watermark, got "
                             f"{self.low_watermark}/{self.target}/{self.high_watermark}")
        return self


class HttpConfig(_Strict):
    """Limits of the HTTP ingress."""

    max_body_bytes: int = Field(64 * 2**20, gt=0, description="Larger request bodies get HTTP 413.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with HTTP 503.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body not received within this long after "
                                                          "its headers gets HTTP 408 (a stalled client).")
    max_concurrent_body_reads: int = Field(64, ge=1, description="Request bodies an ingress replica receives at "
                                                                 "once beyond their first piece; more get HTTP 503 "
                                                                 "with Retry-After, so stalled uploads cannot take "
                                                                 "every slot of the replica.")
    parse_in_thread_bytes: int = Field(64 * 2**10, ge=0, description="Bodies and answers at least this large are "
                                                                     "parsed and encoded on a worker thread, never "
                                                                     "on the ingress's event loop.")
    parse_binary_in_thread_bytes: int = Field(
        8 * 2**20, ge=0, description="Binary tensors (the binary extension, gRPC's raw_input_contents) are taken "
                                     "as views of the body, so their parse does not grow with their size: it is "
                                     "run on the event loop below this many bytes (a 4.6 MiB ResNet batch: 0.15 ms "
                                     "inline, 0.41 ms through a worker thread on the CPU machine).")
    parse_in_process_bytes: int = Field(1 * 2**20, ge=0, description="JSON bodies at least this large are parsed in "
                                                                     "a worker process: a JSON parser holds the GIL "
                                                                     "for the whole parse, which a thread cannot "
                                                                     "hide from the event loop.")
    parse_processes: int = Field(2, ge=0, description="Worker processes per ingress replica for large JSON bodies "
                                                      "(started on the first one); 0: threads only.")
    by_value_max_bytes: int = Field(1 * 2**20, ge=0, description="Requests whose tensors total at most this many "
                                                                 "bytes go from the ingress to the model replica by "
                                                                 "value, over Serve's replica gRPC, instead of "
                                                                 "through Ray's object store; 0: always by "
                                                                 "reference.")


#: CUDA VMM's allocation granularity on current NVIDIA GPUs; chunks must be multiples of it.
_VMM_GRANULARITY_BYTES = 2 * 2**20


class ContextPoolConfig(_Strict):
    """One pool of context memory per GPU, lent per call to whichever replica runs one
    (``engine_runtime.memory.pool``). Replicas fall back to their own mechanism where it cannot run."""

    enabled: bool = Field(False, description="Lease context memory from the GPU's shared pool where possible.")
    chunk_bytes: int = Field(DEFAULT_CHUNK_BYTES, gt=0,
                             description="Size of one pool chunk; a multiple of the 2 MiB VMM granularity.")
    initial_bytes: int = Field(0, ge=0, description="What the pool holds when it starts, before the "
                                                    "coordinator's first target.")
    keep_mapped: bool = Field(True, description="Leave a call's chunks mapped in the replica after it gives "
                                                "them back, so that its next call maps only chunks another "
                                                "replica took meanwhile (the lease still guards every call).")
    max_bytes: int | None = Field(None, gt=0, description="The most the pool may hold: the context memory of "
                                                          "the calls that may run at once (at least the largest "
                                                          "one); None: no cap beyond every pooled replica "
                                                          "calling at once.")

    @model_validator(mode="after")
    def _sizes(self) -> ContextPoolConfig:
        if self.chunk_bytes % _VMM_GRANULARITY_BYTES:
            raise ValueError(f"chunk_bytes must be a multiple of {_VMM_GRANULARITY_BYTES} (2 MiB), "
                             f"got {self.chunk_bytes}")
        if self.max_bytes is not None and self.max_bytes < self.chunk_bytes:
            raise ValueError(f"max_bytes {self.max_bytes} is below one chunk ({self.chunk_bytes})")
        if self.max_bytes is not None and self.initial_bytes > self.max_bytes:
            raise ValueError(f"need initial_bytes <= max_bytes, got {self.initial_bytes} > {self.max_bytes}")
        return self


#: What a grouped model may not set itself: one replica process holds the whole group,
#: so its memory mode, pin and batch queue are the group's (``groups[].mode`` ...).
GROUP_WIDE_FIELDS = ("mode", "pin", "batching")


class GroupConfig(_Strict):
    """Several models in one Serve deployment whose every replica is one process (one
    CUDA context) holding an engine per model; weights are tiered by bytes between the
    GPU and pinned host memory. Requests reach a replica through Serve's model
    multiplexing (the model name is the multiplexed model id)."""

    name: Annotated[str, Field(pattern=_NAME, description="Group name: the name of its Serve deployment "
                                                          "(its options go under `deployments:`).")]
    gpu_weights_budget_bytes: int | None = Field(
        None, gt=0, description="Bytes of weights a replica keeps on its GPU; past it idle models' weights "
                                "leave the GPU (host_tier), least frequently used lately first (LRU-2). "
                                "None: no limit but the card.")
    host_tier: bool = Field(True, description="Weights leaving the GPU go to pinned host memory (a call brings "
                                              "them back in one copy); false: they are dropped and the engine "
                                              "is built again on its next call.")
    mode: Literal["static", "dynamic"] = Field("dynamic", description="Initial memory mode of every engine "
                                                                      "of a replica.")
    pin: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="auto lets the coordinator move the group's replicas; static/dynamic pins them.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig,
                                     description="Dynamic batching; a batch only ever holds one model's requests.")
    page_out_under_pressure: bool = Field(
        True, description="Let the coordinator page out cold models' weights when the GPU is above its high "
                          "watermark (before it moves static replicas to dynamic).")
    cold_after_s: float = Field(30.0, ge=0, description="A model unused this long is cold: the coordinator "
                                                        "may page its weights out under pressure.")


class CudaConfig(_Strict):
    """Process-wide CUDA settings, applied by every replica process (grouped or not)
    right after CUDA initialises and before any engine exists."""

    stack_limit_bytes: int | None = Field(
        256, gt=0, le=1 << 20,
        description="CUDA's per-thread stack limit (cudaLimitStackSize). 256 saved 198 MiB per process on an "
                    "H200 with outputs unchanged (the driver raises it for a kernel that needs more); never "
                    "changed once graphs are captured. None: leave CUDA's default.")


class AppConfig(_Strict):
    """Everything under ``args`` of Ebb's application."""

    models: list[ModelConfig] = Field(min_length=1, description="The models served: one deployment each, or "
                                                                "their group's.")
    groups: list[GroupConfig] = Field(default_factory=list, description="Groups of models sharing one replica "
                                                                        "process (models[].group names one).")
    cuda: CudaConfig = Field(default_factory=CudaConfig, description="Process-wide CUDA settings of replicas.")
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig, description="Mode policy.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP limits.")
    context_pool: ContextPoolConfig = Field(default_factory=ContextPoolConfig,
                                            description="The per-GPU context-memory pool (off by default).")
    model_dirs: list[str] = Field(default_factory=lambda: ["."],
                                  description="Plan/ONNX paths must resolve inside one of these folders.")
    engine_cache_dir: str = Field(".engine_cache", description="Where engines built from ONNX are cached.")
    embed: str | None = Field(
        None, description="A model (without a group) or a group that runs inside each ingress replica instead "
                          "of in replicas of its own: no hop between the protocol and the engine "
                          "(deployments.local_handle). Its GPU share, replicas and user_config are then "
                          "EbbIngress's in the deployments list; other models keep their deployments.")

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {dup}")
        if "EbbIngress" in names:
            raise ValueError("'EbbIngress' is reserved for the HTTP ingress deployment")
        problems = _group_problems(self)
        if self.embed is not None and self.embed not in self.deployment_names():
            grouped = next((m for m in self.models if m.name == self.embed), None)
            hint = (f"model {self.embed!r} is in group {grouped.group!r}: embed the group" if grouped is not None
                    else f"embeddable: {self.deployment_names()}")
            problems.append(f"embed: {self.embed!r} is neither a model without a group nor a group ({hint})")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def dump_for_replicas(self) -> dict:
        """What replicas validate again: only the keys the user set (defaults fill in as
        here), so that checks on what a user set (``GROUP_WIDE_FIELDS``) hold the same there."""
        return self.model_dump(mode="json", exclude_unset=True)

    def group(self, name: str) -> GroupConfig:
        """The group called ``name`` (validated to exist for every ``models[].group``)."""
        return next(g for g in self.groups if g.name == name)

    def group_models(self, name: str) -> list[ModelConfig]:
        """The models of group ``name``, in config order."""
        return [m for m in self.models if m.group == name]

    def deployment_names(self) -> list[str]:
        """Ungrouped models, then groups: each a Serve deployment of its own unless it is ``embed``
        (the ingress aside)."""
        return [m.name for m in self.models if m.group is None] + [g.name for g in self.groups]


def _group_problems(cfg: AppConfig) -> list[str]:
    """Each inconsistency between ``groups`` and ``models[].group``, as ``key.path: what``."""
    problems = []
    group_names = [g.name for g in cfg.groups]
    model_names = {m.name: i for i, m in enumerate(cfg.models)}
    for i, g in enumerate(cfg.groups):
        if group_names.index(g.name) != i:
            problems.append(f"groups.{i}.name: {g.name!r} is already the name of groups.{group_names.index(g.name)}")
        if g.name == "EbbIngress":
            problems.append(f"groups.{i}.name: 'EbbIngress' is reserved for the HTTP ingress deployment")
        if g.name in model_names:
            problems.append(f"groups.{i}.name: {g.name!r} is also the name of models.{model_names[g.name]}; "
                            f"both name a Serve deployment")
        if not any(m.group == g.name for m in cfg.models):
            problems.append(f"groups.{i}: group {g.name!r} has no models (set models[].group: {g.name})")
    for i, m in enumerate(cfg.models):
        if m.group is None:
            continue
        if m.group not in group_names:
            problems.append(f"models.{i}.group: unknown group {m.group!r}; groups: {group_names}")
            continue
        own = sorted(set(GROUP_WIDE_FIELDS) & m.model_fields_set)
        if own:
            j = group_names.index(m.group)
            problems.extend(f"models.{i}.{key}: model {m.name!r} is in group {m.group!r}, whose replicas "
                            f"share one {key}: set groups.{j}.{key} instead" for key in own)
    return problems


def parse_app_config(args: dict) -> AppConfig:
    """Validate ``args``; raise ConfigError listing every bad key by its path."""
    try:
        return AppConfig.model_validate(args or {})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            if not e["loc"] and e["type"] == "value_error":
                # A check across keys (AppConfig's): its lines carry their own paths.
                lines.extend(f"  {line}" for line in str(e["ctx"]["error"]).splitlines())
                continue
            path = ".".join(str(p) for p in e["loc"]) or "<args>"
            lines.append(f"  {path}: {e['msg']}")
        raise ConfigError("invalid Ebb application args:\n" + "\n".join(lines)) from None


def resolve_model_path(path: str, model_dirs: list[str]) -> Path:
    """The real path of ``path``, which must lie inside one of ``model_dirs``.

    Symlinks and ``..`` are resolved first, so a path cannot escape the folders it is
    allowed in.
    """
    if re.search(r"[\x00]", path):
        raise ConfigError(f"model path {path!r} contains a NUL byte")
    roots = [Path(d).expanduser().resolve() for d in model_dirs]
    candidate = Path(path).expanduser()
    try:
        candidates = [candidate.resolve()] if candidate.is_absolute() else [(r / candidate).resolve() for r in roots]
        for real in candidates:
            if any(real == r or r in real.parents for r in roots) and real.is_file():
                return real
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop (RuntimeError before 3.13)
        raise ConfigError(f"model path {path[:200]!r} cannot be resolved: {err.__class__.__name__}") from err
    raise ConfigError(f"model path {path!r} is not a file inside the model_dirs {[str(r) for r in roots]}")
