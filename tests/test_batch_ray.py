"""`lora-resize batch --ray` on a local Ray cluster (ray.init(num_cpus=2)): the same outputs, byte for byte,
as the local batch on the same tree (tests/test_batch.py's), no base norm computed on a worker, and a
worker SIGKILLed inside a write (after its temp file is complete, before it is moved into place) is
retried by Ray: the outputs are still the local batch's, each input and recipe is done once, and no temp
is left. Skips only when Ray is not installed (the optional extra ``[ray]``)."""
import os
import signal

import pytest

from core.cli import main
from tests.conftest import ROOT
from tests.helpers import skip_or_fail
from tests.test_batch import DONE_PAIRS, _args, _base, _make_tree, _outputs, _records, _temps

try:
    import ray
except ImportError:  # the optional extra; .ci/run installs it, and under CI=true its absence fails
    ray = None


@pytest.fixture(scope="module")
def cluster():
    if ray is None:
        skip_or_fail('ray is not installed (pip install "comfyui-lora-resize[ray]")')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_batch")
    lib, base, out = _make_tree(root), _base(root), root / "local"
    assert main(_args(lib, out, base)) == 1
    return lib, base, _outputs(out), _records(out)


def _statuses(records) -> list:
    return sorted((os.path.basename(r["input"]), r["recipe"], r["status"]) for r in records)


def test_ray_gives_the_local_batch_bytes_and_computes_no_norm_on_a_worker(cluster, local, tmp_path, monkeypatch):
    from core.base import open_base
    from core.batch_ray import RayRunner
    from core.formats import read_lora
    from tests.test_batch import LORAS, SD15

    lib, _, outputs, records = local
    base = _base(tmp_path)  # a fresh cache: the driver computes every norm, the workers none
    out = tmp_path / "ray"
    shared = []
    put = RayRunner.put
    monkeypatch.setattr(RayRunner, "put", lambda self, value: shared.append(value) or put(self, value))
    assert main(_args(lib, out, base, "--ray")) == 1
    names = open_base(base).names()
    touched = {(layer.name, layer.offset) for name in SD15
               for layer in read_lora(os.path.join(LORAS, name + ".safetensors")) if layer.name in names}
    assert len(shared) == 1 and len(shared[0]) == len(touched)  # one family's norms, once, in the object store
    assert all(set(values) == {"frobenius"} for values in shared[0].values())  # what fro_ckpt needs
    assert _outputs(out) == outputs
    ours = _records(out)
    assert _statuses(ours) == _statuses(records)
    done = [r for r in ours if r["status"] == "done"]
    assert len(done) == DONE_PAIRS and all(r["norms_computed"] == 0 for r in done)
    assert main(_args(lib, out, base, "--ray")) == 1  # resume on Ray too: re-work = 0
    assert [r for r in _records(out)[len(ours):] if r["status"] == "done"] == []


def test_a_worker_killed_mid_write_is_retried_without_partial_files(cluster, local, tmp_path, monkeypatch):
    from core.batch_ray import RayRunner

    lib, base, outputs, _ = local
    out = tmp_path / "ray"
    flag = str(tmp_path / "killed-once")

    def dies_once(task, settings, norms):  # runs on a worker: the first task to get here dies mid-write
        import core.atomic
        from core.batch_ray import ray_resize_file

        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return ray_resize_file(task, settings, norms)

        def publish(tmp, target, overwrite):  # the temp is whole; the rename never happens
            with open(flag, "w") as fh:
                fh.write(f"{os.getpid()} {tmp}")
            os.kill(os.getpid(), signal.SIGKILL)

        core.atomic._publish = publish
        return ray_resize_file(task, settings, norms)

    monkeypatch.setattr(RayRunner, "task", staticmethod(dies_once))
    assert main(_args(lib, out, base, "--ray")) == 1
    _, temp = open(flag).read().split(" ", 1)
    assert temp.startswith(str(out)) and not os.path.exists(temp)  # the killed writer's temp was swept
    assert _outputs(out) == outputs
    assert _temps(out) == []
    done = [(r["input"], r["recipe"]) for r in _records(out) if r["status"] == "done"]
    assert len(done) == len(set(done)) == DONE_PAIRS
