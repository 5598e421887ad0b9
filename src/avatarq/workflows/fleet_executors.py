"""Where a fleet's identities run: a process pool on this machine, or a Ray cluster.

Both executors run the same task, `process_identity`, once per identity and hand each
`IdentityResult` to ``on_result`` as it arrives (completion order). A task that never
returns (its worker process died, Ray lost the node) becomes a failed result with one line;
the other identities go on.

Ray is optional (``pip install 'avatarq[fleet]'``) and imported only by `run_on_ray`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from avatarq.errors import AvatarqError
from avatarq.workflows.fleet_identity import IdentityResult, failed_result, process_identity
from avatarq.workflows.fleet_manifest import IdentityTask

OnResult = Callable[[IdentityResult], None]
#: What `--ray local` means: start a Ray instance on this machine for this run only.
RAY_LOCAL = "local"
RAY_INSTALL_HINT = "pip install 'avatarq[fleet]' (or pip install ray)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def default_threads(workers: int) -> int:
    """Threads per identity when ``workers`` identities share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_in_pool(
    tasks: Sequence[IdentityTask], workers: int, on_result: OnResult
) -> list[IdentityResult]:
    """Run ``tasks`` on a pool of ``workers`` fresh Python processes (spawned, so no state of
    this process is shared); returns the results in completion order."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise AvatarqError(f"--workers must be an integer >= 1, got {workers!r}")
    results: list[IdentityResult] = []
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context)
    try:
        futures = {pool.submit(process_identity, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - the worker died, not the identity
                result = failed_result(
                    futures[future], f"worker process failed: {_first_line(exc)}"
                )
            results.append(result)
            on_result(result)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def import_ray():  # noqa: ANN201 - the ray module
    """The ray module, or a one-line AvatarqError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AvatarqError(f"--ray needs Ray, which is not installed; {RAY_INSTALL_HINT}") from None
    return ray


def run_on_ray(
    tasks: Sequence[IdentityTask], address: str, on_result: OnResult, cpus_per_task: int = 1
) -> list[IdentityResult]:
    """Run ``tasks`` as Ray tasks (``cpus_per_task`` CPUs each); returns the results in
    completion order.

    ``address`` is what ``ray.init(address=...)`` takes: ``auto`` (the cluster this machine
    belongs to), ``HOST:PORT`` or ``ray://HOST:PORT``; ``local`` starts a Ray instance on
    this machine for this run. A process already connected to Ray (``ray.is_initialized()``)
    keeps its connection. Every node needs avatarq installed and the manifest's paths and the
    output folder at the same place (a shared file system).
    """
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address == RAY_LOCAL:
                ray.init(include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, ...
            raise AvatarqError(
                f"--ray {address}: cannot start or reach Ray ({_first_line(exc)})"
            ) from None
        started = True
    try:
        remote = ray.remote(num_cpus=max(1, cpus_per_task), max_retries=0)(process_identity)
        pending = {remote.remote(task): task for task in tasks}
        results: list[IdentityResult] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a lost worker or node
                    result = failed_result(task, f"Ray task failed: {_first_line(exc)}")
                results.append(result)
                on_result(result)
        return results
    finally:
        if started:
            ray.shutdown()
