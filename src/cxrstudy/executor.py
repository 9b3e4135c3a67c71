"""A Dask cluster as a pool of workers for the pipeline's steps: one task per step, resources per task.

The driver (the process that runs ``pipeline.run_profile``) submits tasks and collects their results; the
project folder must be the same path on every node (a shared filesystem), which ``DaskPool.check_workers`` checks
before any step is submitted. Without a scheduler address the pool starts a cluster on this machine, bound to
127.0.0.1. A worker lost in the middle of a task fails that task (``TaskLost``): the pool's own cluster does not
retry it elsewhere (a step is a long training; the step cache resumes the run instead).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: The loopback address every process of a local cluster listens on.
LOOPBACK = "127.0.0.1"
#: The hash seed a Dask nanny gives its workers when none is set (distributed.nanny.Nanny).
NANNY_HASH_SEED = "6640"
#: How long the driver waits for a first worker to join an existing scheduler.
WORKER_WAIT_S = 60


class TaskLost(RuntimeError):
    """A task did not finish because its worker died or left the cluster."""


class ClusterError(RuntimeError):
    """The cluster cannot run the study: no worker, a worker that does not see the project, no usable resource."""


def gpu_count() -> int:
    """CUDA devices this machine's torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_cluster(n_workers: int | None = None, cpus_per_task: int = 1) -> Any:
    """A cluster of this machine bound to 127.0.0.1, on which a task whose worker dies fails at once (no retry).

    With CUDA GPUs and dask-cuda installed: dask-cuda's ``LocalCUDACluster``, one worker per GPU, each with the
    resource ``GPU=1``. Otherwise ``n_workers`` one-thread worker processes (default: CPU count // ``cpus_per_task``),
    each with the resource ``CPU=cpus_per_task``. The workers get this process's environment as it is (no
    one-thread BLAS settings of Dask's nanny), as the local run's kernels do.
    """
    import dask
    from distributed import LocalCluster

    common = {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0", "threads_per_worker": 1}
    settings = {
        "distributed.scheduler.allowed-failures": 0,
        # A nanny puts these into its own process's environment too: none of its BLAS/malloc settings; the hash
        # seed as this process has it ("random" is Python's default).
        "distributed.nanny.pre-spawn-environ": {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "random")},
    }
    with dask.config.set(settings):
        gpus = gpu_count()
        if gpus:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                print(
                    f"executor: {gpus} GPU(s) but dask-cuda is not installed: one worker shares them "
                    "(pip install dask-cuda for one worker per GPU)",
                    flush=True,
                )
                return LocalCluster(n_workers=1, resources={"GPU": 1}, **common)
            return LocalCUDACluster(n_workers=n_workers or gpus, resources={"GPU": 1}, **common)
        n = n_workers or max(1, (os.cpu_count() or 1) // cpus_per_task)
        return LocalCluster(n_workers=n, processes=True, resources={"CPU": cpus_per_task}, **common)


def task_resources(workers: dict[str, dict], cpus_per_task: int) -> dict[str, float] | None:
    """What each task asks of a worker: one GPU where a worker declares GPUs, else ``cpus_per_task`` CPUs where a
    worker declares CPUs, else nothing (one task per worker thread); ClusterError when no worker has enough CPUs."""
    declared = [w.get("resources") or {} for w in workers.values()]
    if any("GPU" in r for r in declared):
        return {"GPU": 1}
    cpus = [r["CPU"] for r in declared if "CPU" in r]
    if not cpus:
        return None
    if max(cpus) < cpus_per_task:
        raise ClusterError(
            f"each task asks for {cpus_per_task} CPUs (cpus_per_task) but the workers declare at most {max(cpus)} "
            "(start them with `dask worker ... --resources CPU=N`)"
        )
    return {"CPU": cpus_per_task}


def task_slots(worker: dict, resources: dict[str, float] | None) -> int:
    """How many tasks asking for ``resources`` a worker (scheduler info: ``nthreads``, ``resources``) runs at once."""
    if not resources:
        return int(worker.get("nthreads") or 1)
    have = worker.get("resources") or {}
    return min(int(have.get(k, 0) // v) for k, v in resources.items())


def tasks_share_cores(workers: dict[str, dict], resources: dict[str, float] | None) -> bool:
    """Whether some host runs more than one task at once (its workers' ``task_slots`` summed per host)."""
    per_host: Counter[str] = Counter()
    for w in workers.values():
        per_host[str(w.get("host"))] += task_slots(w, resources)
    return any(n > 1 for n in per_host.values())


def worker_environ() -> dict[str, str]:
    """This process's environment without what a Dask nanny sets in its workers before they start
    (``distributed.nanny.pre-spawn-environ``: one BLAS/OpenMP thread, a small malloc trim threshold; a fixed hash
    seed), so that a
    step's kernel runs as it would in the local run (the same thread count gives the same numbers)."""
    import dask

    nanny = {k: str(v) for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).items()}
    nanny.setdefault("PYTHONHASHSEED", NANNY_HASH_SEED)
    return {k: v for k, v in os.environ.items() if nanny.get(k) != v}


def task_location() -> dict[str, str]:
    """Where the calling task runs: the node's host name and, on a Dask worker, the worker's address."""
    where = {"node": socket.gethostname()}
    try:
        from distributed import get_worker

        where["worker"] = get_worker().address
    except (ImportError, ValueError):  # not on a worker
        pass
    return where


class DaskPool:
    """A Dask client, the cluster it started (if any) and the resources each task asks for."""

    def __init__(self, client: Any, cluster: Any | None, cpus_per_task: int = 1) -> None:
        self.client = client
        self.cluster = cluster
        if not client.scheduler_info()["workers"]:
            try:
                client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            except TimeoutError as exc:
                raise ClusterError(
                    f"no worker joined the scheduler {client.scheduler.address} within {WORKER_WAIT_S} s"
                ) from exc
        workers = self.workers()
        self.resources = task_resources(workers, cpus_per_task)
        self.shares_cores = tasks_share_cores(workers, self.resources)

    @classmethod
    @contextmanager
    def open(
        cls, scheduler: str | None = None, n_workers: int | None = None, cpus_per_task: int = 1
    ) -> Iterator[DaskPool]:
        """A pool on the scheduler at ``scheduler``, else on a cluster of this machine (``local_cluster``) that is
        closed at the end."""
        from distributed import Client

        cluster = None if scheduler else local_cluster(n_workers, cpus_per_task)
        try:
            client = Client(scheduler or cluster)
        except OSError as exc:
            if cluster is not None:
                cluster.close()
            raise ClusterError(f"cannot reach the Dask scheduler {scheduler or cluster}: {exc}") from exc
        try:
            yield cls(client, cluster, cpus_per_task)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()

    def workers(self) -> dict[str, dict]:
        """The scheduler's workers: address -> its info (host, nthreads, resources, ...)."""
        return self.client.scheduler_info(n_workers=-1)["workers"]

    def slots(self) -> int:
        """How many tasks the cluster's workers run at once now (``task_slots`` summed)."""
        return sum(task_slots(w, self.resources) for w in self.workers().values())

    def describe(self) -> dict[str, Any]:
        """The executor's entry of run.json: scheduler address, cluster kind, workers, what each task asks for."""
        return {
            "name": "dask",
            "scheduler": self.client.scheduler.address,
            "cluster": type(self.cluster).__name__ if self.cluster is not None else "external",
            "task_resources": self.resources,
            "tasks_share_cores": self.shares_cores,
            "workers": {
                addr: {"host": w.get("host"), "nthreads": w.get("nthreads"), "resources": w.get("resources") or {}}
                for addr, w in sorted(self.workers().items())
            },
        }

    def check_workers(self, check: Callable[..., list[str]], *args: Any) -> None:
        """Run ``check(*args)`` on every worker (a list of problems, empty when fine); ClusterError naming each
        worker's problems."""
        found = self.client.run(check, *args)
        bad = {addr: problems for addr, problems in sorted(found.items()) if problems}
        if bad:
            lines = "\n".join(f"  {addr}: {p}" for addr, problems in bad.items() for p in problems)
            raise ClusterError(
                f"{len(bad)} of {len(found)} worker(s) cannot run the study:\n{lines}\n"
                "every node must see the project folder at the same path (a shared filesystem) and run the "
                "project's environment (README, 'Running on a cluster')"
            )

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Submit ``fn(*args)`` as one task (never cached, never retried) asking for the pool's resources."""
        return self.client.submit(
            fn, *args, key=f"{name}-{uuid.uuid4().hex[:8]}", pure=False, retries=0, resources=self.resources
        )

    def wait_first(self, futures: list[Any]) -> list[Any]:
        """The futures among ``futures`` that have finished, waiting for at least one."""
        from distributed import wait

        return list(wait(futures, return_when="FIRST_COMPLETED").done)

    @staticmethod
    def result(future: Any) -> Any:
        """A finished task's value; its own exception as raised, TaskLost when its worker was lost or it was cancelled."""
        from distributed import KilledWorker
        from distributed.comm.core import CommClosedError

        try:
            return future.result()
        except KilledWorker as exc:
            raise TaskLost(f"its worker died or left the cluster ({exc})") from exc
        except CommClosedError as exc:
            raise TaskLost(f"the connection to the cluster was lost ({exc})") from exc
        except Exception as exc:
            if type(exc).__name__ in {"CancelledError", "FutureCancelledError"}:
                raise TaskLost(f"it was cancelled ({exc})") from exc
            raise
