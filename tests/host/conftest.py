import pytest

from tests.helpers import skip_or_fail
from tests.host.comfy_models import comfyui_path


@pytest.fixture(scope="session")
def comfy_hosts():
    """Skips (with the reason shown in the summary) when no ComfyUI checkout is available; fails under CI."""
    if comfyui_path() is None:
        skip_or_fail("ComfyUI host not found: set COMFYUI_PATH to a ComfyUI checkout (or install the pack "
                     "in ComfyUI/custom_nodes) to run the host tests")
    from tests.host.comfy_models import BUILDERS, import_comfy

    import_comfy()
    return BUILDERS


@pytest.fixture(scope="session")
def server(comfy_hosts, tmp_path_factory):
    """One real ComfyUI server for all server and browser tests (see tests/host/server.py)."""
    pytest.importorskip("requests")
    from tests.host.server import ServerFailed, running_server

    try:
        with running_server(tmp_path_factory.mktemp("comfy_base")) as handle:
            yield handle
    except ServerFailed as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def pack(comfy_hosts):
    """The repo imported as ComfyUI imports a custom node folder (a package with relative imports)."""
    from tests.host.comfy_models import import_custom_node
    from tests.host.server import ROOT

    return import_custom_node("comfyui_lora_resize_under_test", ROOT)


@pytest.fixture()
def folders(comfy_hosts, tmp_path, monkeypatch):
    import folder_paths

    loras, checkpoints = tmp_path / "loras", tmp_path / "checkpoints"
    loras.mkdir()
    checkpoints.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(checkpoints)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("loras", None)
    return loras, checkpoints
