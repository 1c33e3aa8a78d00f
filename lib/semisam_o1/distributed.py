"""Per-image work over a pool, in this process or as Ray tasks (``--conf ray_address``).

:class:`PoolRunner` maps a module-level function over items and yields ``(item, value, error)`` as each
finishes, in completion order:

- ``address=""``: in this process, one item after another (nothing to install or start).
- ``address="local"``: a Ray instance started by this process on this machine with ``workers`` CPUs;
  it stops with :meth:`PoolRunner.close`.
- ``address="auto"``, ``"host:port"`` or ``"ray://host:port"``: an existing Ray cluster. A ``host:port``
  that does not accept a TCP connection within ``connect_timeout`` seconds is a :class:`ClusterError`
  naming it (Ray itself would wait for minutes).

Guarantees:

- The function must be importable by name on every worker (a module-level function of this package)
  and its arguments picklable. Every task asks for 1 CPU and ``num_gpus`` GPUs.
- An exception raised by the function is the item's ``error`` (not retried); a task whose worker
  process or node died is retried by Ray (``max_retries``), so the function must be idempotent:
  this package's caches are (content-hash file names, one writer per file under a file lock,
  :func:`~semisam_o1.volumes.atomic_write` after removing what an interrupted writer left).
- :meth:`PoolRunner.check_shared_path` proves, on every node of the cluster, that a folder written
  by this process is readable and writable there (the datastore must be on storage every worker
  sees, e.g. NFS); otherwise a :class:`ClusterError` names the node and the path.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no socket holds now (for a rendezvous or a child server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ClusterError(RuntimeError):
    """The Ray cluster cannot be used: unreachable address, or a worker that cannot see the datastore."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` / ``ray://host:port``; ``None`` for ``auto`` and ``local``."""
    rest = address.removeprefix("ray://")
    if address in ("", "auto", "local") or ":" not in rest:
        return None
    host, port = rest.rsplit(":", 1)
    return host, int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`ClusterError` naming ``address`` when its host does not accept a TCP connection."""
    target = _host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"--conf ray_address {address!r}: no Ray cluster reachable there ({e})") from None


def _probe_path(path: str, marker: str) -> tuple[str, str | None]:
    """On one worker: ``(hostname, None)`` when ``path/marker`` is visible and ``path`` writable, else
    ``(hostname, problem)``."""
    host = socket.gethostname()
    folder = Path(path)
    if not folder.is_dir():
        return host, "the folder does not exist there"
    if not (folder / marker).exists():
        return host, "the folder there is not the one this server wrote to (not shared storage)"
    probe = folder / f".{marker}.{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return host, f"not writable there ({e.strerror})"
    return host, None


class PoolRunner:
    """Runs ``fn(item, *args)`` for many items, here or on Ray (see the module docstring).

    Args:
        address: ``""``, ``"local"``, ``"auto"``, ``"host:port"`` or ``"ray://host:port"``.
        workers: CPUs of the Ray instance that ``"local"`` starts.
        num_gpus: GPUs each task asks for (1 when the work runs on CUDA, else 0).
        max_retries: Ray's retries of a task whose worker died.
    """

    def __init__(self, address: str = "", workers: int = 2, num_gpus: float = 0.0, max_retries: int = 3,
                 connect_timeout: float = 5.0):
        self.address, self.workers, self.num_gpus, self.max_retries = address, workers, num_gpus, max_retries
        self._owns_ray = False
        if address:
            self._connect(connect_timeout)

    @property
    def distributed(self) -> bool:
        return bool(self.address)

    def _connect(self, timeout: float) -> None:
        check_reachable(self.address, timeout)
        import ray

        if ray.is_initialized():
            return
        try:
            if self.address == "local":
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            self._owns_ray = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"--conf ray_address {self.address!r}: cannot connect ({e})") from None

    def cluster_gpus(self) -> float:
        """GPUs the cluster offers (0 in process)."""
        if not self.distributed:
            return 0.0
        import ray

        return float(ray.cluster_resources().get("GPU", 0))

    def close(self) -> None:
        """Disconnect what this runner connected: a ``local`` instance stops; a cluster goes on without us."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "PoolRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_shared_path(self, path: Path) -> None:
        """Every alive node of the cluster sees ``path`` (the same folder, readable and writable).

        Raises:
            ClusterError: ``"worker <host> (<ip>) cannot use the datastore <path>: <problem>"``.
        """
        if not self.distributed:
            return
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        path = Path(path).resolve()
        marker = f".ray-check-{uuid.uuid4().hex[:12]}"
        (path / marker).write_text("this folder is the datastore")
        try:
            probe = ray.remote(_probe_path)
            nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
            refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(path), marker): n
                    for n in nodes}
            for ref, node in refs.items():
                host, problem = ray.get(ref, timeout=120)
                if problem:
                    raise ClusterError(f"worker {host} ({node.get('NodeManagerAddress')}) cannot use the datastore {path}: {problem}")
        finally:
            (path / marker).unlink(missing_ok=True)

    def map(self, fn: Callable, items: Iterable, *args: Any, desc: str = "", progress: bool = False,
            before_each: Callable[[], Any] | None = None) -> Iterator[tuple[Any, Any, Exception | None]]:
        """Yield ``(item, fn(item, *args), None)``, or ``(item, None, exception)``, for every item as it finishes.

        ``before_each()`` is called before each item in this process (the server's interactive
        priority); on Ray it is not called (the work is elsewhere).
        """
        items = list(items)
        where = f"as Ray tasks ({self.address})" if self.distributed else "in this process"
        logger.info(f"{desc or getattr(fn, '__name__', 'work')}: {len(items)} items {where}")
        bar = tqdm(total=len(items), desc=desc, unit="image", disable=not progress)
        try:
            if not self.distributed:
                for item in items:
                    if before_each is not None:
                        before_each()
                    try:
                        value, error = fn(item, *args), None
                    except Exception as e:  # the caller decides which errors stop the pool
                        value, error = None, e
                    bar.update(1)
                    yield item, value, error
                return
            yield from self._map_ray(fn, items, args, bar, desc)
        finally:
            bar.close()

    def _map_ray(self, fn, items, args, bar, desc: str) -> Iterator[tuple[Any, Any, Exception | None]]:
        import ray

        task = ray.remote(fn).options(num_cpus=1, num_gpus=self.num_gpus, max_retries=self.max_retries, retry_exceptions=False)
        shared = [ray.put(a) for a in args]  # large arguments (templates) stored once, not once per task
        pending = {task.remote(item, *shared): item for item in items}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            item = pending.pop(ref)
            try:
                value, error = ray.get(ref), None
            except ray.exceptions.RayError as e:  # the function raised, or its worker died more than max_retries times
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                value, error = None, cause
            bar.update(1)
            logger.info(f"{desc} {len(items) - len(pending)}/{len(items)} {item}")
            yield item, value, error
