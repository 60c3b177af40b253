"""The frontend in headless Debian Chromium against the real server: every UI-format example workflow
loads with no missing node and converts back to its API twin; a resize run draws the rank chart on
the ResizeLoRA node with the numbers of that run. The screenshot is kept in tests/artifacts/."""
import json
import os
import time

import pytest

from tests.helpers import skip_or_fail
from tests.host import browser
from tests.host.server import ROOT, TINY_LORA, WORKFLOWS

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
UI_WORKFLOWS = sorted(name for name in os.listdir(WORKFLOWS) if name.endswith(".json")
                      and not name.endswith("_api.json"))


@pytest.fixture(scope="module")
def page(server):
    reason = browser.missing()
    if reason:
        skip_or_fail(f"browser test: {reason}")
    with browser.Browser() as chromium:
        chromium.open_comfy(server["url"])
        yield chromium


def _load(page, name: str) -> dict:
    """Load a UI workflow; returns {missing: [types], prompt: graphToPrompt().output}."""
    with open(os.path.join(WORKFLOWS, name)) as fh:
        graph = json.load(fh)
    return page.run("""
        const [graph, name] = arguments;
        await window.app.loadGraphData(graph, true, true, name);
        const missing = window.app.graph._nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]);
        const prompt = await window.app.graphToPrompt();
        done({missing, prompt: prompt.output});
    """, graph, name)


def test_there_is_a_ui_twin_for_every_api_workflow():
    api = sorted(n.replace("_api.json", ".json") for n in os.listdir(WORKFLOWS) if n.endswith("_api.json"))
    assert UI_WORKFLOWS == api and len(api) >= 5


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_loads_with_no_missing_node_and_equals_its_api_twin(page, name):
    loaded = _load(page, name)
    assert loaded["missing"] == []
    with open(os.path.join(WORKFLOWS, name.replace(".json", "_api.json"))) as fh:
        twin = json.load(fh)
    prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in loaded["prompt"].items()}
    assert prompt == twin
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.run("const c = window.app.canvas; c.ds.scale = 0.75; c.ds.offset = [10, 10]; c.setDirty(true, true);"
             "c.draw(true, true); done(true)")
    page.driver.save_screenshot(os.path.join(ARTIFACTS, name.replace(".json", ".png")))


_SWAP_IN_TINY_SDXL = """
    const graph = window.app.graph;
    const old = graph._nodes.find(n => n.type === 'CheckpointLoaderSimple');
    const tiny = LiteGraph.createNode('LoraResizeTest_TinySDXL');
    graph.add(tiny);
    tiny.pos = [...old.pos];
    old.outputs.forEach((output, slot) => (output.links || []).slice().forEach(id => {
        const link = graph.links[id] ?? graph.links.get?.(id);
        tiny.connect(slot, graph.getNodeById(link.target_id), link.target_slot);
    }));
    graph.remove(old);
    const loader = graph._nodes.find(n => n.type === 'LoraResize_LoadLoRAForResize');
    loader.widgets.find(w => w.name === 'lora_name').value = arguments[0];
    done(graph._nodes.map(n => n.type));
"""

_RUN_AND_READ_CHART = """
    const graph = window.app.graph;
    const node = graph._nodes.find(n => n.type === 'LoraResize_ResizeLoRA');
    await window.app.queuePrompt(0, 1);
    const start = Date.now();
    while (!node.loraResizeChart && Date.now() - start < 120000) await new Promise(r => setTimeout(r, 250));
    if (!node.loraResizeChart) { done({error: 'no chart after 120 s'}); return; }
    // record what the chart draws: every fillText / fillRect while the canvas redraws once
    const proto = CanvasRenderingContext2D.prototype;
    const [fillText, fillRect] = [proto.fillText, proto.fillRect];
    const texts = [], bars = [];
    proto.fillText = function (text, ...rest) { texts.push(String(text)); return fillText.call(this, text, ...rest); };
    proto.fillRect = function (...args) { bars.push([this.fillStyle, ...args]); return fillRect.apply(this, args); };
    try { window.app.canvas.draw(true, true); } finally { proto.fillText = fillText; proto.fillRect = fillRect; }
    // center the view on the node for the screenshot
    const canvas = window.app.canvas;
    canvas.ds.offset = [-node.pos[0] + 420, -node.pos[1] + 160];
    canvas.ds.scale = 1.3;
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    done({chart: node.loraResizeChart, texts, bars, id: node.id, size: node.size});
"""


def test_resize_run_draws_the_chart_with_the_numbers_of_the_run(page, server):
    from core.formats import read_lora

    _load(page, "resize_with_base.json")
    page.run(_SWAP_IN_TINY_SDXL, TINY_LORA)
    drawn = page.run(_RUN_AND_READ_CHART)
    chart = drawn["chart"]
    blocks = chart["blocks"]
    assert len(blocks) >= 5 and chart["size_after"] < chart["size_before"]
    # the numbers the server reported for this run are the numbers on the node
    # (the node's 'executed' message comes before the prompt's later nodes finish and its history is written)
    runs: list = []
    deadline = time.monotonic() + 120
    while not runs and time.monotonic() < deadline:
        history = server["requests"].get(f"{server['url']}/history", timeout=10).json()
        runs = [entry["outputs"][str(drawn["id"])]["lora_resize_chart"][0] for entry in history.values()
                if entry.get("status", {}).get("completed")
                and str(drawn["id"]) in entry.get("outputs", {})
                and "lora_resize_chart" in entry["outputs"][str(drawn["id"])]]
        if not runs:
            time.sleep(0.25)
    assert runs and runs[-1] == chart
    # and the file the run saved holds exactly the kept ranks the chart shows
    saved = sorted((server["loras"] / "resized").glob("my_sdxl_lora_*.safetensors"), key=os.path.getmtime)[-1]
    assert sum(b["kept"] for b in blocks) == sum(layer.rank for layer in read_lora(saved))
    source = read_lora(server["loras"] / TINY_LORA)
    assert sum(b["original"] for b in blocks) == sum(layer.rank for layer in source)
    # what was drawn: one "kept/original" label and two bars per block, and the summary line
    texts = drawn["texts"]
    for block in blocks:
        assert block["block"] in texts and f"{block['kept']}/{block['original']}" in texts
    mib = lambda b: f"{b / 1048576:.2f}"  # noqa: E731
    summary = f"{mib(chart['size_before'])} → {mib(chart['size_after'])} MiB  error {100 * chart['error']:.2f}%"
    assert any(t.startswith(summary) for t in texts), (summary, [t for t in texts if "MiB" in t])
    kept_bars = [b for b in drawn["bars"] if b[0] in ("#4a9", "#44aa99")]
    assert len(kept_bars) >= sum(1 for b in blocks if b["kept"] > 0)
    os.makedirs(ARTIFACTS, exist_ok=True)
    time.sleep(0.5)
    shot = os.path.join(ARTIFACTS, "resize_chart.png")
    assert page.driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
