"""The command line's torch threads (core.devices.console_threads) and the norm workers that follow them."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from core import devices, norms
from tests.conftest import ROOT


@pytest.fixture()
def threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(devices, "CPU_THREADS", None)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_the_command_leaves_the_pipelines_side_threads_their_cores(threads, monkeypatch, cores):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    devices.console_threads()
    assert torch.get_num_threads() == max(1, cores - 2)
    assert devices.CPU_THREADS == cores
    # base norms still use the cores (one worker per core, at most MAX_WORKERS), each worker at torch's threads
    assert norms._workers("cpu", 100) == min(norms.MAX_WORKERS, max(cores, cores - 2))
    assert norms._workers("cpu", 1) == 1


def test_an_explicit_omp_num_threads_is_kept(threads, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    devices.console_threads()
    assert torch.get_num_threads() == 1 and devices.CPU_THREADS is None
    assert norms._workers("cpu", 100) == 1  # OMP_NUM_THREADS=1 keeps the whole run on one core


def test_python_m_core_chooses_the_threads_and_main_as_a_library_call_does_not():
    fixture = os.path.join("tests", "fixtures", "lora", "sd15_peft_r4a8_meta.safetensors")
    code = ("import runpy, sys, torch, core.cli\n"
            f"core.cli.main(['inspect', {fixture!r}]); print('THREADS', torch.get_num_threads())\n"
            f"sys.argv = ['core', 'inspect', {fixture!r}]\n"
            "try:\n    runpy.run_module('core', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('THREADS', torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    library, command = (int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("THREADS "))
    default = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                                 capture_output=True, text=True, check=True).stdout)
    assert library == default  # main() as a library call leaves torch's threads alone
    assert command == max(1, (os.cpu_count() or 1) - 2)
