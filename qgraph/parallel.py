"""Evaluating many model variants over one data set: inline, in local worker processes, or on Ray.

A job is ``map(task, shared, items)``: `shared` (model bytes, data batches, reference outputs)
travels once per worker and each item is one task. Local workers receive `shared` as their
pool initializer's argument (forked processes that build their own ORT session); on Ray it goes into
the object store once (``ray.put``) and every task gets the reference. A worker turns `shared`
into its state once (``prepare``: e.g. an ORT session) and keeps it for every task it runs.
Results come back in item order, and every ORT session used for evaluation runs one intra-op
thread, so a report does not depend on where, or in which order, its tasks ran.

Ray is an optional extra (``pip install 'qgraph[ray]'``), imported only when asked for.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from qgraph.errors import ConfigError

RAY_HINT = "pip install 'qgraph[ray]'"


def default_workers() -> int:
    """One worker per available core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Evaluator:
    """Where variant tasks run: `workers` local processes (1: in this process, 0: one per core),
    or a Ray cluster when `ray` is "auto" (the running cluster, else a local one) or an address."""
    workers: int = 0
    ray: str | None = None

    def __post_init__(self):
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ConfigError(f"--workers must be an integer >= 0 (0: one per core), got {self.workers!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise ConfigError(f"--ray must be 'auto' or a cluster address like 10.0.0.5:6379, got {self.ray!r}")

    @property
    def size(self) -> int:
        return self.workers or default_workers()

    def describe(self) -> str:
        if self.ray:
            return f"ray ({self.ray})"
        return "in process" if self.size == 1 else f"{self.size} local workers"

    def map(self, prepare: Callable[[Any], Any], task: Callable[[Any, Any], Any], shared: Any,
            items: Sequence[Any]) -> list:
        """``[task(prepare(shared), item) for item in items]``, spread over the workers."""
        items = list(items)
        if not items:
            return []
        token = uuid.uuid4().hex
        if self.ray:
            return _ray_map(self.ray, self.workers, prepare, task, shared, items, token)
        if self.size == 1 or len(items) == 1:
            state = prepare(shared)
            return [task(state, item) for item in items]
        return _local_map(self.size, prepare, task, shared, items, token)


# -- local processes ------------------------------------------------------------------------------

_WORKER_STATE: dict[str, Any] = {}   # per worker process: token -> prepared state


def _init_worker(token: str, prepare, shared) -> None:
    _WORKER_STATE.clear()
    _WORKER_STATE[token] = prepare(shared)


def _run_local(token: str, task, item):
    return task(_WORKER_STATE[token], item)


def _local_map(workers: int, prepare, task, shared, items, token: str) -> list:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # fork: a script without a `__main__` guard would re-run itself under spawn; the parent's
    # ORT sessions are idle between runs, and every worker builds its own session
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers = min(workers, len(items))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(token, prepare, shared)) as pool:
        futures = [pool.submit(_run_local, token, task, item) for item in items]
        return [f.result() for f in futures]


# -- Ray ------------------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed; {RAY_HINT}") from None
    return ray


def connect_ray(address: str, workers: int = 0):
    """The ray module, connected: an already initialised session, the cluster at `address`, or
    for "auto" the running cluster if there is one, else a local instance (`workers` CPUs)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == "auto":
            try:
                ray.init(address="auto", **options)
            except (ConnectionError, RuntimeError, ValueError):
                ray.init(num_cpus=workers or None, **options)
        else:
            ray.init(address=address, **options)
    except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
        raise ConfigError(f"--ray {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0][:200]}); "
                          "start one with `ray start --head` or use --ray auto") from None
    return ray


_RAY_STATE: dict[str, Any] = {}      # per Ray worker process: token -> prepared state


def _run_ray(token: str, prepare, task, shared, item):
    if token not in _RAY_STATE:
        _RAY_STATE.clear()
        _RAY_STATE[token] = prepare(shared)
    return task(_RAY_STATE[token], item)


def _ray_map(address: str, workers: int, prepare, task, shared, items, token: str) -> list:
    ray = connect_ray(address, workers)
    remote = ray.remote(num_cpus=1)(_run_ray)
    ref = ray.put(shared)
    return ray.get([remote.remote(token, prepare, task, ref, item) for item in items])
