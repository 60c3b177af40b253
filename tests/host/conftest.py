import pytest

from tests.host.comfy_models import comfyui_path


@pytest.fixture(scope="session")
def comfy_hosts():
    """Skips (with the reason shown in the summary) when no ComfyUI checkout is available."""
    if comfyui_path() is None:
        pytest.skip("ComfyUI host not found: set COMFYUI_PATH to a ComfyUI checkout (or install the pack "
                    "in ComfyUI/custom_nodes) to run the host tests")
    from tests.host.comfy_models import BUILDERS, import_comfy

    import_comfy()
    return BUILDERS
