"""Resize LoRA Folder in headless Chromium against the real server: its example workflow, on the tiny SDXL,
draws the run's table on the node (one row per LoRA: file, status, ranks, MiB before → after, error) with
the numbers the server reported. The screenshot is kept in tests/artifacts/resize_folder_table.png."""
import os
import time

from tests.host.test_browser_chart import ARTIFACTS, _load, page  # noqa: F401  (fixture)
from tests.host.test_folder_node import _library

_SWAP_AND_POINT = """
    const [subfolder, output] = arguments;
    const graph = window.app.graph;
    const old = graph._nodes.find(n => n.type === 'CheckpointLoaderSimple');
    const tiny = LiteGraph.createNode('LoraResizeTest_TinySDXL');
    graph.add(tiny);
    tiny.pos = [...old.pos];
    old.outputs.forEach((out, slot) => (out.links || []).slice().forEach(id => {
        const link = graph.links[id] ?? graph.links.get?.(id);
        tiny.connect(slot, graph.getNodeById(link.target_id), link.target_slot);
    }));
    graph.remove(old);
    const node = graph._nodes.find(n => n.type === 'LoraResize_ResizeLoRAFolder');
    node.widgets.find(w => w.name === 'subfolder').value = subfolder;
    node.widgets.find(w => w.name === 'output_subfolder').value = output;
    done(graph._nodes.map(n => n.type));
"""

_RUN_AND_READ_TABLE = """
    const node = window.app.graph._nodes.find(n => n.type === 'LoraResize_ResizeLoRAFolder');
    await window.app.queuePrompt(0, 1);
    const start = Date.now();
    while (!node.loraResizeFolder && Date.now() - start < 180000) await new Promise(r => setTimeout(r, 250));
    if (!node.loraResizeFolder) { done({error: 'no table after 180 s'}); return; }
    const proto = CanvasRenderingContext2D.prototype;
    const fillText = proto.fillText;
    const texts = [];
    proto.fillText = function (text, ...rest) { texts.push(String(text)); return fillText.call(this, text, ...rest); };
    try { window.app.canvas.draw(true, true); } finally { proto.fillText = fillText; }
    const canvas = window.app.canvas;
    canvas.ds.offset = [-node.pos[0] + 60, -node.pos[1] + 60];
    canvas.ds.scale = 1.2;
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    done({table: node.loraResizeFolder, texts, id: node.id});
"""


def test_folder_run_draws_its_table_with_the_numbers_of_the_run(page, server, comfy_hosts):  # noqa: F811
    _library(server["loras"] / "browser", comfy_hosts["sdxl"]())
    _load(page, "resize_folder.json")
    page.run(_SWAP_AND_POINT, "browser/library", "browser/resized")
    drawn = page.run(_RUN_AND_READ_TABLE)
    assert "error" not in drawn, drawn
    table = drawn["table"]
    rows = {row["file"]: row for row in table["rows"]}
    assert sorted(rows) == ["broken.safetensors", "first.safetensors", "sd15_other.safetensors",
                            "sub/second.safetensors"]
    assert [rows[f]["status"] for f in ("first.safetensors", "sub/second.safetensors")] == ["done", "done"]
    assert rows["broken.safetensors"]["status"] == "failed"
    written = sorted((server["loras"] / "browser" / "resized").rglob("*.safetensors"))
    assert len(written) == 2
    texts = drawn["texts"]
    assert table["summary"] in texts and table["summary"].endswith("2 done, 0 already done, 0 skipped, 2 failed")
    for row in table["rows"]:  # every row drawn: its file, status and ranks (cells are clipped to fit)
        assert row["file"] in texts and row["status"] in texts
        if row["status"] == "done":
            assert row["ranks"] in texts and f"{row['mib_before']} → {row['mib_after']}" in texts
    # the server reported the same table for this node
    reported: list = []
    deadline = time.monotonic() + 60
    while not reported and time.monotonic() < deadline:  # history is written just after 'executed'
        history = server["requests"].get(f"{server['url']}/history", timeout=10).json()
        reported = [entry["outputs"][str(drawn["id"])]["lora_resize_folder"][0] for entry in history.values()
                    if entry.get("status", {}).get("completed")
                    and "lora_resize_folder" in entry.get("outputs", {}).get(str(drawn["id"]), {})]
        time.sleep(0 if reported else 0.25)
    assert reported and reported[-1] == table
    os.makedirs(ARTIFACTS, exist_ok=True)
    time.sleep(0.5)
    shot = os.path.join(ARTIFACTS, "resize_folder_table.png")
    assert page.driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
