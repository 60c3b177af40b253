"""Write the UI-format twin of every example_workflows/*_api.json, made by the ComfyUI frontend itself.

    python tools/make_ui_workflows.py http://127.0.0.1:8188

Needs a running ComfyUI with this pack installed, Debian's chromium + chromium-driver, and selenium.
The frontend loads each API workflow (app.loadApiJson) and serializes its graph, so the files are
exactly what the frontend would save; nodes are laid out left to right by graph depth. The browser
test (tests/host/test_browser_chart.py) checks that each UI file converts back to its API twin.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.host.browser import Browser  # noqa: E402

GAP = 40


def depths(api: dict) -> dict[str, int]:
    """Longest path from a source node: the column each node goes in."""
    memo: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in memo:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            memo[node_id] = 1 + max((depth(str(src)) for src in links), default=-1)
        return memo[node_id]

    for node_id in api:
        depth(node_id)
    return memo


def orders(api: dict, columns: dict[str, int]) -> dict[str, float]:
    """Vertical order within each column: the barycentre of a node's inputs' places (the usual
    layered-graph heuristic), so each branch of a graph (A and B of the preview) stays in its row."""
    place: dict[str, float] = {}
    for column in sorted(set(columns.values())):
        nodes = [n for n in api if columns[n] == column]
        def key(node_id: str) -> tuple[float, int]:
            sources = [place[str(v[0])] for v in api[node_id]["inputs"].values()
                       if isinstance(v, list) and str(v[0]) in place]
            return (sum(sources) / len(sources) if sources else float(int(node_id)), int(node_id))
        for rank, node_id in enumerate(sorted(nodes, key=key)):
            place[node_id] = rank
    return place


LAYOUT = """
const [api, name, columns, gap, order] = arguments;
await window.app.loadApiJson(api, name);
const byColumn = {};
for (const node of window.app.graph._nodes) {
  (byColumn[columns[String(node.id)]] ??= []).push(node);
  // A/B comparisons need the same noise on every run: no seed randomizing after a run
  for (const widget of node.widgets ?? []) if (widget.name === 'control_after_generate') widget.value = 'fixed';
}
let x = 40;
for (const index of Object.keys(byColumn).map(Number).sort((a, b) => a - b)) {
  let y = 60, width = 0;
  for (const node of byColumn[index].sort((a, b) => order[String(a.id)] - order[String(b.id)])) {
    const [w, h] = node.computeSize();
    node.size = [Math.max(node.size[0], w), Math.max(node.size[1], h)];
    node.pos = [x, y];
    y += node.size[1] + gap + 30;  // 30: the title bar
    width = Math.max(width, node.size[0]);
  }
  x += width + gap + 20;
}
window.app.graph.setDirtyCanvas(true, true);
done(JSON.stringify(window.app.graph.serialize()));  // JSON drops undefined (WebDriver makes it null)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    args = parser.parse_args()
    with Browser() as browser:
        browser.open_comfy(args.url)
        for path in sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*_api.json"))):
            with open(path) as fh:
                api = json.load(fh)
            name = os.path.basename(path).replace("_api.json", ".json")
            columns = depths(api)
            graph = json.loads(browser.run(LAYOUT, api, name, columns, GAP, orders(api, columns)))
            out = os.path.join(os.path.dirname(path), name)
            with open(out, "w") as fh:
                json.dump(graph, fh, indent=1)
                fh.write("\n")
            print(f"{out}: {len(graph['nodes'])} nodes, {len(graph['links'])} links")


if __name__ == "__main__":
    main()
