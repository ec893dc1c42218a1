"""Per-sample work of a certification spread over local worker processes or a Ray cluster.

Each worker is a spawned process (a fork after torch started its thread pool can deadlock)
that receives the graph and the run's settings once, at start, and then chunks of sample
indices; it returns, per sample, the bounds on the logit differences over the sample's box.
Chunks are small so that the load stays balanced. A worker that dies (killed, out of
memory) breaks the pool: the chunks not yet returned are given to a fresh pool, at most
``RETRIES`` times, so no sample is lost and none is counted twice (a result is kept only
the first time its index arrives). The workers share the parent's torch threads
(:func:`worker_threads`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

RETRIES = 3
_STATE: dict[str, Any] = {}


def _start_worker(task: Callable, payload: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _STATE.update(task=task, payload=payload)


def _run_chunk(indices: list[int]) -> list[tuple[int, list[float], float, str]]:
    task, payload = _STATE["task"], _STATE["payload"]
    out = []
    for i in indices:
        start = time.perf_counter()
        bounds = task(payload, i)
        out.append((i, bounds, time.perf_counter() - start, f"pid {os.getpid()}"))
    return out


def worker_threads(workers: int) -> int:
    """torch threads per worker: the parent's count divided among the workers, so that the
    workers do not oversubscribe the cores (OpenMP threads that fight for a core make a run
    several times slower: measured 62.7 s against 17.4 s, bench/certify_scale.py). At
    another thread count BLAS may block a product differently, so a bound can differ from a
    serial run's in its last bits (each is sound: the rounding pads cover any summation
    order); ``LIPCERT_WORKER_THREADS=N`` sets the count, and the parent's count reproduces
    a serial run's arithmetic to the bit (tests check it)."""
    import torch

    from .errors import positive_int_env

    default = max(1, torch.get_num_threads() // workers)
    return positive_int_env("LIPCERT_WORKER_THREADS", default, "threads")


def chunks(indices: list[int], workers: int, largest: int = 16) -> list[list[int]]:
    """About four chunks per worker, at most ``largest`` samples each
    (``LIPCERT_CHUNK_SIZE=N`` fixes the size; ``bench/certify_scale.py --chunks`` measures
    it)."""
    from .errors import positive_int_env

    size = max(1, min(largest, len(indices) // max(1, 4 * workers)))
    size = positive_int_env("LIPCERT_CHUNK_SIZE", size, "samples")
    return [indices[k:k + size] for k in range(0, len(indices), size)]


def run_samples(task: Callable[[dict, int], list[float]], payload: dict[str, Any],
                indices: list[int], workers: int, cluster: RayCluster | None = None
                ) -> Iterator[tuple[int, list[float], float, str]]:
    """Yield (index, bounds, seconds, worker) for every index, in completion order.

    ``task(payload, i)`` runs in the workers (a module-level function, so it pickles);
    with a Ray ``cluster`` the work goes to its tasks instead."""
    if cluster is not None:
        yield from run_samples_ray(task, payload, indices, cluster)
        return
    if workers <= 1:
        for i in indices:
            start = time.perf_counter()
            yield i, task(payload, i), time.perf_counter() - start, "main"
        return
    threads = worker_threads(workers)
    pending = chunks(indices, workers)
    done: set[int] = set()
    for _ in range(RETRIES + 1):
        pending = yield from _one_pool(task, payload, pending, workers, threads, done)
        if not pending:
            return
    raise RuntimeError(f"certification workers died {RETRIES + 1} times; "
                       f"{sum(map(len, pending))} samples were not bounded")


def _one_pool(task, payload, pending: list[list[int]], workers: int, threads: int,
              done: set[int]):
    """Run ``pending`` chunks on one pool; returns the chunks left when a worker died."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_start_worker, initargs=(task, payload, threads))
    futures = {pool.submit(_run_chunk, chunk): chunk for chunk in pending}
    broken = False
    try:
        while futures and not broken:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    results = future.result()
                except BrokenProcessPool:
                    broken = True  # this chunk stays in ``futures``: retried
                    continue
                futures.pop(future)
                for i, bounds, seconds, worker in results:
                    if i not in done:  # a retried chunk may repeat a finished sample
                        done.add(i)
                        yield i, bounds, seconds, worker
    except BaseException:  # Ctrl-C, or the consumer failed: stop the workers now
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=not broken, cancel_futures=True)
    left = [[i for i in chunk if i not in done] for chunk in futures.values()]
    return [c for c in left if c]


def _ray_chunk(task, payload, indices: list[int], threads: int):
    import torch

    torch.set_num_threads(threads)
    _STATE.update(task=task, payload=payload)
    return _run_chunk(indices)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address nothing answers on (Ray itself retries for minutes)."""
    import socket
    from urllib.parse import urlsplit

    from .errors import InputError

    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise InputError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); "
                         "start a cluster with `ray start --head`, or use --ray local") from None


class RayCluster:
    """A Ray connection for one run: ``address`` "auto" joins the running cluster, an
    address (``host:port``, ``ray://…``) joins that one, "local" starts a private local
    instance (stopped at the end). Ray is an optional extra: without it, exit 2."""

    def __init__(self, address: str, num_cpus: int | None = None):
        from .errors import InputError

        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'lipcert[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started and address not in ("local", "auto"):
            _check_reachable(address)
        if self.started:
            try:
                if address == "local":
                    ray.init(num_cpus=num_cpus, include_dashboard=False,
                             log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"--ray {address}: cannot connect to a Ray cluster "
                                 f"({' '.join(str(exc).split())[:300]}); start one with "
                                 "`ray start --head`, or use --ray local") from None
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def run_samples_ray(task: Callable[[dict, int], list[float]], payload: dict[str, Any],
                    indices: list[int], cluster: RayCluster
                    ) -> Iterator[tuple[int, list[float], float, str]]:
    """:func:`run_samples` as Ray tasks: the payload (graph, data) goes to the object store
    once; chunks are sized for about four per CPU of the cluster; a task on a worker or node
    that dies is retried by Ray (``max_retries``), and an index is kept only once."""
    ray = cluster.ray
    remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_ray_chunk)
    shared = ray.put(payload)
    # one CPU per task, one thread unless LIPCERT_WORKER_THREADS says otherwise (see
    # worker_threads: the parent's count reproduces a serial run's arithmetic)
    from .errors import positive_int_env

    threads = positive_int_env("LIPCERT_WORKER_THREADS", 1, "threads")
    pending = [remote.remote(task, shared, chunk, threads)
               for chunk in chunks(indices, cluster.cpus)]
    done: set[int] = set()
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for i, bounds, seconds, worker in ray.get(ready[0]):
                if i not in done:
                    done.add(i)
                    yield i, bounds, seconds, f"ray {worker}"
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
