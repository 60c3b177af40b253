"""The batch on a Ray cluster (``lora-resize batch ... --ray [ADDRESS]``): each file is a Ray task.

An optional extra (``pip install "comfyui-lora-resize[ray]"``), never a requirement of the node pack:
Ray is imported only here, only when asked for. The driver does what the local batch does (inputs,
manifest, resume, base norms once per family); the norms of each family go into the object store once
and every task of that family gets them from there, so no worker computes one. Paths must be on
storage every node sees (the same path on every node). A worker killed mid-file (a node lost, the OOM
killer) leaves no output at the target name (writes are atomic) and Ray runs the task again
(``max_retries``); the retry's first write into that folder sweeps the dead writer's temp when the
retry runs on the same host. ``--gpus-per-task G`` asks Ray for G GPUs per task and computes there.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence

from .errors import UsageError

log = logging.getLogger("lora_resize")
RETRIES = 3  # attempts after a worker dies mid-task


def ray_resize_file(task, settings, norms: Optional[dict]):
    """One file on a Ray worker: its family's norms (resolved from the object store by Ray) first."""
    from .batch import resize_file

    if norms and task.base is not None:
        task.base.norms = norms
    return resize_file(task, settings)


class RayRunner:
    """The batch's runner interface (``map``, ``close``) over Ray tasks; ``put`` shares a value."""

    shares_norms = True
    pool = None
    task = staticmethod(ray_resize_file)

    def __init__(self, address: Optional[str] = None, gpus_per_task: float = 0.0, retries: int = RETRIES):
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray, which is not installed",
                             fix='pip install "comfyui-lora-resize[ray]" (or pip install ray)') from None
        self.ray = ray
        self.gpus, self.retries = gpus_per_task, retries
        self.started = not ray.is_initialized()
        if self.started:  # a local cluster (no address) finds this checkout through the workers' cwd
            ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": _package_root()}} if not address else None)
        self.pending: list = []

    def put(self, value: Any):
        return self.ray.put(value)

    def map(self, fn: Callable, calls: Sequence[tuple], on_done: Callable[[int, Any], None]) -> None:
        remote = self.ray.remote(num_cpus=1, num_gpus=self.gpus, max_retries=self.retries)(fn)
        refs = {remote.remote(*call): index for index, call in enumerate(calls)}
        self.pending = list(refs)
        while refs:
            finished, _ = self.ray.wait(list(refs), num_returns=1)
            for ref in finished:
                on_done(refs.pop(ref), self.ray.get(ref))

    def close(self, interrupted: bool = False) -> None:
        if interrupted:  # a KeyboardInterrupt in each running task: its temp is removed as it unwinds
            for ref in self.pending:
                try:
                    self.ray.cancel(ref, force=False)
                except Exception:  # already finished, or the cluster is gone
                    pass
        self.pending = []
        if self.started:
            self.ray.shutdown()


def _package_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    existing = os.environ.get("PYTHONPATH")
    root = os.path.dirname(here)
    return root if not existing else os.pathsep.join([root, existing])
