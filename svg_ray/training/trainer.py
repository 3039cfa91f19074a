"""The one training loop both Ray Train jobs run, and the one driver that launches it.

The shape follows torchtitan's ``Trainer`` (with ``FluxTrainer`` overriding only its batch and
step hooks): everything that is the same for every job lives here once (restore, epochs, the
position inside an epoch, logging cadence averaged over ranks, checkpoints, images, export, MLflow
run state); a job is a ``TrainTask`` that builds its models and provides batches, one step, its
state and its export. ``autoencoder.py`` and ``diffusion.py`` are the two tasks.

Driver side (``launch``): the job has validated its settings and planned its data into a
``JobPlan``; the driver creates or re-attaches the MLflow run (refusing settings that would change
the result of a resumed run), starts Ray, fits, and ends the MLflow run FINISHED, FAILED or KILLED.
Worker side (``train_worker``): rebuilds the task from its typed spec and runs ``Trainer.train``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar, Generic, TypeVar

import torch

from svg_ray.config import ConfigError, from_dict, to_dict
from svg_ray.errors import SvgRayError
from svg_ray.training.common import (
    RunSettings,
    Throughput,
    TrainConfig,
    device_and_precision,
    fit,
    load_checkpoint,
    save_checkpoint,
    step_seed,
)

# --------------------------------------------------------------------------------------------
# What crosses the process boundary
# --------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """Where a run lives and reports: the same for every job and every worker."""

    tracking_uri: str
    """MLflow tracking URI the workers log to."""
    run_id: str
    """The MLflow run (created or re-attached by the driver)."""
    run_uri: str
    """The run's folder: checkpoints and exported models."""
    register_as: str | None = None
    """MLflow model name to register the exported model under (None: do not register)."""
    alias: str | None = None
    """Registry alias to point at the new version (with ``register_as``)."""
    async_checkpoint: bool = True
    """Upload checkpoints in the background (``RunSettings.async_checkpoint``)."""


@dataclass
class Position:
    """Where training stands: steps done, the epoch, and steps done inside that epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass
class RunResult:
    """What a finished ``launch`` returns (the job's own result adds where its model went)."""

    run_id: str
    """The MLflow run."""
    resumed: bool
    """Whether an earlier run of the same name was continued."""
    metrics: dict[str, Any]
    """The last metrics every rank reported (``step`` included)."""
    checkpoint: str | None
    """The latest checkpoint's location."""
    tracking_uri: str
    """MLflow tracking URI."""
    output: str
    """The exported model: a sampler bundle folder or an autoencoder file."""

    @property
    def step(self) -> int:
        """The step training stopped at."""
        return int(self.metrics.get("step", 0))


@dataclass
class JobPlan:
    """Everything a job worked out on the driver before any worker starts."""

    task: type[TrainTask[Any, Any]]
    """The worker-side task class."""
    spec: Any
    """The task's typed worker spec (a dataclass; travels through ``to_dict``/``from_dict``)."""
    params: dict[str, Any]
    """Nested settings logged as MLflow params (flattened); compared on resubmission."""
    output: str
    """Where the exported model will be."""
    describe: str
    """What the start line tells about the data and workers."""
    datasets: Callable[[], dict[str, Any]] = dict
    """Builds the Ray Datasets handed to the workers (called once Ray is up)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Plan artefacts every worker needs that are data, not settings (e.g. the shard index):
    pickled to the workers as they are, beside the typed spec."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra MLflow run tags."""
    record_inputs: Callable[[str, str], Any] | None = None
    """(tracking URI, run id) -> records the training data as the run's MLflow dataset input."""


# --------------------------------------------------------------------------------------------
# The task interface
# --------------------------------------------------------------------------------------------

TASKS: dict[str, type[TrainTask[Any, Any]]] = {}
"""Every task class by its kind (filled as the job modules define them)."""


@dataclass
class WorkerContext:
    """Where this worker runs."""

    rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None
    """Autocast dtype (None: no autocast)."""
    shared: dict[str, Any] = field(default_factory=dict)
    """The job plan's ``shared`` artefacts."""


SpecT = TypeVar("SpecT")
ConfigT = TypeVar("ConfigT", bound=TrainConfig)


class TrainTask(ABC, Generic[SpecT, ConfigT]):
    """One job's part of the loop: its models, batches, step, state and export.

    A task class names its kind, progress label and worker spec type as class keywords:
    ``class DiffusionTask(TrainTask[DiffusionSpec, ...], kind=..., label=..., spec=...)``.
    """

    kind: ClassVar[str]
    """Checkpoint and MLflow kind; a run of another kind is refused."""
    label: ClassVar[str]
    """Prefix of the progress lines (the CLI command)."""
    spec_type: ClassVar[type]
    """The worker spec dataclass ``from_dict`` rebuilds on the worker."""

    def __init_subclass__(cls, *, kind: str, label: str, spec: type, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.kind, cls.label, cls.spec_type = kind, label, spec
        TASKS[kind] = cls  # ``train_worker`` finds the task by the kind its config names

    def __init__(self, spec: Any, ctx: WorkerContext) -> None:
        """What every task keeps; a task's own ``__init__`` then builds its models and
        optimisers on ``ctx.device`` (identically seeded on every rank)."""
        assert spec.run is not None, "the driver fills in the run context"
        self.spec: SpecT = spec
        self.ctx = ctx
        self.run: RunContext = spec.run
        self.cfg: ConfigT = spec.train
        self.steps_per_epoch: int = spec.steps_per_epoch
        self.per_worker = self.cfg.per_worker_batch(ctx.world)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The task's part of a checkpoint (weights, optimisers, ...)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (called before ``prepare``)."""

    @abstractmethod
    def prepare(self) -> None:
        """After restoring: wrap models for DDP, attach dataset shards."""

    @abstractmethod
    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """Batches ``start..steps_per_epoch - 1`` of ``epoch`` for this rank, in a fixed order."""

    @abstractmethod
    def step(self, batch: Any, step: int) -> dict[str, Any]:
        """One optimisation step; the returned logs are averaged over ranks when logged."""

    def position(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        """Where this rank's data stands (recorded in checkpoints; resume recomputes it)."""
        return {"epoch": epoch, "step": step_in_epoch}

    def counters(self) -> dict[str, float]:
        """Counts summed over ranks when logging (e.g. skipped inputs this epoch)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Rank-0 metrics added to every log line (e.g. the learning rate)."""
        return {}

    def first_metrics(self) -> dict[str, float]:
        """Metrics logged once at step 0 of a fresh run (e.g. the parameter count)."""
        return {}

    @property
    def images_every(self) -> int:
        """Steps between logged image grids (0: only at the end)."""
        return 0

    @abstractmethod
    def log_images(self, logger: Any, step: int) -> None:
        """Log an image grid (rank 0)."""

    @abstractmethod
    def export(self, logger: Any, step: int) -> None:
        """Write the final model to storage and MLflow and register it (rank 0)."""


# --------------------------------------------------------------------------------------------
# Worker: the loop
# --------------------------------------------------------------------------------------------


class Trainer:
    """Runs a task: restore, then step, log, image and checkpoint until ``cfg.steps``."""

    def __init__(self, task: TrainTask[Any, Any], ctx: WorkerContext) -> None:
        self.task, self.ctx = task, ctx
        self.cfg = task.cfg
        self.pos = Position()
        self.meter = Throughput()
        # Step logs summed since the last log line (on the device: no host sync per step).
        self._sums: dict[str, Any] = {}
        self._counts: dict[str, int] = {}
        self.logger: Any = None

    def restore(self) -> None:
        """Load the latest checkpoint, if any, into the task and the position."""
        state = load_checkpoint()
        if state is not None:
            kind = state.get("kind", "diffusion")  # checkpoints from before the field: DiT only
            if kind != self.task.kind:
                raise ConfigError(
                    f"the checkpoint in {self.task.run.run_uri} is from a {kind} run, not "
                    f"this {self.task.kind} run: choose another --name or --storage-path"
                )
            self.task.load_state_dict(state)
            self.pos = Position(state["step"], state["epoch"], state["step_in_epoch"])
            if self.pos.step_in_epoch >= self.task.steps_per_epoch:  # saved at an epoch's end
                self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)
        self.task.prepare()

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: the task's state plus the position and provenance."""
        return {
            **self.task.state_dict(),
            "kind": self.task.kind,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "step_in_epoch": self.pos.step_in_epoch,
            "data_position": self.task.position(self.pos.epoch, self.pos.step_in_epoch),
            "seed": self.cfg.seed,
            "mlflow_run_id": self.task.run.run_id,
        }

    def train(self) -> None:
        """The loop; rank 0 exports the model and finishes the MLflow run at the end."""
        from svg_ray.tracking import RunLogger

        self.restore()
        cfg, task = self.cfg, self.task
        if self.ctx.rank == 0:
            self.logger = RunLogger(task.run.tracking_uri, task.run.run_id, task.label, cfg.steps)
            if self.pos.step == 0 and (first := task.first_metrics()):
                self.logger.metrics(first, 0)
        while self.pos.step < cfg.steps:
            if self._run_epoch():
                self.pos = Position(self.pos.step, self.pos.epoch + 1, 0)
        if self.logger is not None:
            every = task.images_every
            if not (every and self.pos.step % every == 0):  # not logged at this step yet
                task.log_images(self.logger, self.pos.step)
            task.export(self.logger, self.pos.step)
            self.logger.finish()

    def _run_epoch(self) -> bool:
        """Steps of the current epoch from the current position; True if it ran to the end."""
        cfg, task, pos = self.cfg, self.task, self.pos
        batches = task.batches(pos.epoch, pos.step_in_epoch)
        for i in range(pos.step_in_epoch, task.steps_per_epoch):
            t_wait = time.perf_counter()
            batch = next(batches)
            self.meter.wait += time.perf_counter() - t_wait
            # Every random choice of a step (t, noise, masks, dropout) is a function of
            # (seed, step, rank): a resumed run replays exactly what an uninterrupted one does.
            torch.manual_seed(step_seed(cfg.seed, pos.step, self.ctx.rank))
            logs = task.step(batch, pos.step)
            pos.step, pos.step_in_epoch = pos.step + 1, i + 1
            self.meter.samples += cfg.global_batch
            self._cadence(logs)
            if pos.step >= cfg.steps:
                return pos.step_in_epoch == task.steps_per_epoch
        return True

    def _cadence(self, logs: dict[str, Any]) -> None:
        """Log, log images and checkpoint when their intervals come round (all ranks)."""
        for k, v in logs.items():
            v = v.detach() if isinstance(v, torch.Tensor) else float(v)
            self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._counts[k] = self._counts.get(k, 0) + 1
        step, last = self.pos.step, self.pos.step == self.cfg.steps
        if step % self.cfg.log_every == 0 or last:
            self._log()
        every = self.task.images_every
        if self.logger is not None and every and step % every == 0:
            self.task.log_images(self.logger, step)
        if step % self.cfg.checkpoint_every == 0 or last:
            metrics = {"step": step, **{k: float(v) for k, v in logs.items()}}
            stall = save_checkpoint(self.state_dict(), metrics, self.task.run.async_checkpoint)
            if self.logger is not None:  # what the ranks waited for: the local write + barrier
                self.logger.metrics({"checkpoint_stall_s": stall}, step)

    def _log(self) -> None:
        """Average the logs of the steps since the last log line over those steps and the ranks
        (and sum the counters over ranks); rank 0 logs them."""
        import torch.distributed as dist

        keys = sorted(self._sums)  # identical on every rank: every rank runs the same steps
        means = [float(self._sums[k]) / self._counts[k] for k in keys]
        self._sums, self._counts = {}, {}
        counters = self.task.counters()
        ckeys = sorted(counters)
        values = torch.tensor(means + [counters[k] for k in ckeys], dtype=torch.float64).to(
            self.ctx.device
        )  # NCCL reduces device tensors only
        if self.ctx.world > 1:
            dist.all_reduce(values)
            values[: len(keys)] /= self.ctx.world
        if self.logger is None:
            self.meter.reset()
            return
        out = dict(zip(keys + ckeys, values.tolist(), strict=True))
        _, ips, wait = self.meter.window()
        out.update(
            {"images_per_s": ips, "data_wait_fraction": wait, "epoch": self.pos.epoch},
            **self.task.metrics(),
        )
        self.logger.metrics(out, self.pos.step)
        self.meter.reset()


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop function: rebuild the task from its spec, train."""
    import importlib

    import ray.train

    importlib.import_module(config["module"])  # registers the task class
    task_cls = TASKS[config["kind"]]
    spec: Any = from_dict(task_cls.spec_type, config["spec"], config["kind"])
    ctx = ray.train.get_context()
    device, amp = device_and_precision(spec.train.precision)
    wctx = WorkerContext(
        ctx.get_world_rank(), ctx.get_world_size(), device, amp, config.get("shared", {})
    )
    Trainer(task_cls(spec, wctx), wctx).train()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


class TrainingFailedError(SvgRayError):
    """The workers failed more often than ``max_failures`` allows."""


def _last_line(error: BaseException) -> str:
    """The innermost error message of a worker failure (Ray wraps it in a long report)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or [type(error).__name__])[-1]


class Stopped(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, a pod eviction) while the driver waits for the workers."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(f"signal {signum}")


def launch(plan: JobPlan, run: RunSettings) -> RunResult:
    """Attach MLflow, start Ray, fit; the MLflow run ends FINISHED, FAILED or KILLED.

    Resubmitting the same run settings resumes the run: the same MLflow run is set RUNNING
    again, and settings that would change the result are refused before any worker starts.
    """
    from svg_ray import tracking
    from svg_ray.ray_cluster import ensure_ray

    task = plan.task
    tracking_uri = run.resolved_tracking_uri()
    run_id, resumed = tracking.find_or_create_run(
        tracking_uri, run.experiment, run.name, run.run_uri, task.kind
    )
    tracking.log_params_or_refuse_changes(tracking_uri, run_id, plan.params)
    tracking.start_run(tracking_uri, run_id, plan.tags)
    tracking.record_provenance(tracking_uri, run_id)
    if plan.record_inputs is not None:
        plan.record_inputs(tracking_uri, run_id)
    context = RunContext(
        tracking_uri, run_id, run.run_uri, run.register_as, run.alias, run.async_checkpoint
    )
    print(
        f"[{task.label}] {'resuming' if resumed else 'starting'} run {run.name!r} "
        f"(MLflow run {run_id}); {plan.describe}",
        flush=True,
    )
    try:
        ensure_ray()
        with _sigterm_stops():  # after ray.init, which installs a SIGTERM handler of its own
            result = _fit(plan, run, context)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, `ray job stop`, a pod eviction
        tracking.end_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise
    return RunResult(
        run_id=run_id,
        resumed=resumed,
        metrics=dict(result.metrics or {}),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        tracking_uri=tracking_uri,
        output=plan.output,
    )


def _fit(plan: JobPlan, run: RunSettings, context: RunContext) -> Any:
    """Run the workers; a failure beyond ``max_failures`` becomes one ``TrainingFailedError``."""
    spec = {**to_dict(plan.spec), "run": to_dict(context)}
    config = {
        "kind": plan.task.kind,
        "module": plan.task.__module__,
        "spec": spec,
        "shared": plan.shared,
    }
    try:
        result = fit(train_worker, config, run, plan.datasets())
        error = result.error
    except Exception as e:  # Ray Train V2 raises what older versions returned
        if "TrainingFailedError" not in {c.__name__ for c in type(e).__mro__}:
            raise
        error = e
    if error is not None:
        from svg_ray import storage

        found = storage.storage_error_in(error)  # storage that kept failing: its own one line
        if found is not None:
            raise found from None
        raise TrainingFailedError(
            f"training failed after {run.max_failures} restart(s): {_last_line(error)}; "
            f"MLflow run {context.run_id} is marked FAILED, resubmit the same command to resume "
            "from the last checkpoint"
        ) from error
    return result


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM raises ``Stopped`` in the driver while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
