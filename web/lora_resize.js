// comfyui-lora-resize: draws, on a ResizeLoRA node, original rank against kept rank per block,
// with the size before/after, the threshold and the overall error. Data comes from the node's
// "lora_resize_chart" UI output (nodes/resize.py chart_data).
import { app } from "../../scripts/app.js";

const NODE = "LoraResize_ResizeLoRA";
const ROW = 12;
const HEADER = 22; // the size / error / threshold line above the bars

// Below the node's input and output slots, so the chart never covers a socket label.
function chartTop(node) {
  const slots = Math.max(node.inputs?.length ?? 0, node.outputs?.length ?? 0);
  return slots * (globalThis.LiteGraph?.NODE_SLOT_HEIGHT ?? 20) + 10;
}

function chartHeight(chart) {
  return HEADER + (chart.blocks?.length ?? 0) * ROW + 8;
}

function drawChart(ctx, node, chart) {
  const blocks = chart.blocks || [];
  const top = chartTop(node);
  const width = node.size[0] - 20;
  const max = Math.max(1, ...blocks.map((b) => b.original));
  ctx.save();
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#ddd";
  const mib = (b) => (b / 1048576).toFixed(2);
  const thr = chart.threshold === null || chart.threshold === undefined ? "" :
    `  thr ${Number(chart.threshold).toFixed(3)}`;
  ctx.fillText(`${mib(chart.size_before)} → ${mib(chart.size_after)} MiB  error ${(100 * chart.error).toFixed(2)}%${thr}`,
    10, top + 10);
  blocks.forEach((b, i) => {
    const y = top + 18 + i * ROW;
    const label = 90;
    const bar = width - label - 50;
    ctx.fillStyle = "#aaa";
    ctx.fillText(b.block, 10, y + 9);
    ctx.fillStyle = "#555";
    ctx.fillRect(10 + label, y + 1, (bar * b.original) / max, ROW - 3);
    ctx.fillStyle = "#4a9";
    ctx.fillRect(10 + label, y + 1, (bar * b.kept) / max, ROW - 3);
    ctx.fillStyle = "#ddd";
    ctx.fillText(`${b.kept}/${b.original}`, 10 + label + bar + 4, y + 9);
  });
  ctx.restore();
}

app.registerExtension({
  name: "comfyui-lora-resize.chart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const chart = message?.lora_resize_chart?.[0];
      if (!chart) return;
      this.loraResizeChart = chart;
      const needed = chartTop(this) + chartHeight(chart);
      if (this.size[1] < needed || this.size[0] < 340) {
        this.setSize([Math.max(this.size[0], 340), Math.max(this.size[1], needed)]);
      }
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.loraResizeChart && !this.flags?.collapsed) drawChart(ctx, this, this.loraResizeChart);
    };
  },
});
