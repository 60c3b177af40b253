// comfyui-lora-resize: draws, on a Resize LoRA Folder node, one row per LoRA and recipe: file, status,
// ranks, MiB before/after and the error (or why it failed). Data comes from the node's
// "lora_resize_folder" UI output (nodes/folder.py table_rows).
import { app } from "../../scripts/app.js";

const NODE = "LoraResize_ResizeLoRAFolder";
const ROW = 13;
const HEADER = 30; // the summary line and the column titles
const MAX_ROWS = 40; // a whole library would not fit: the report STRING has every row

// Below the widgets (computeSize is the height of the slots and widgets alone).
function tableTop(node) {
  return node.computeSize()[1] + 4;
}

function tableHeight(table) {
  return HEADER + Math.min(table.rows?.length ?? 0, MAX_ROWS + 1) * ROW + 8;
}

function clip(ctx, text, width) {
  let shown = String(text ?? "");
  while (shown.length > 1 && ctx.measureText(shown).width > width) shown = shown.slice(0, -2) + "…";
  return shown;
}

function drawTable(ctx, node, table) {
  const rows = table.rows || [];
  const top = tableTop(node);
  const width = node.size[0] - 20;
  const columns = [["file", 0.34], ["status", 0.14], ["ranks", 0.16], ["MiB", 0.16], ["error", 0.2]];
  ctx.save();
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(clip(ctx, table.summary, width), 10, top + 10);
  let x = 10;
  ctx.fillStyle = "#999";
  for (const [title, share] of columns) {
    ctx.fillText(title, x, top + 24);
    x += share * width;
  }
  rows.slice(0, MAX_ROWS).forEach((row, i) => {
    const y = top + HEADER + i * ROW + 6;
    const mib = row.mib_after === null || row.mib_after === undefined ? "" :
      `${row.mib_before} → ${row.mib_after}`;
    const done = row.status.startsWith("done");
    // a row that failed or was skipped has no numbers: its reason gets their columns too
    const cells = done ? [row.file, row.status, row.ranks, mib, row.error] : [row.file, row.status, row.error];
    const shares = done ? columns.map((c) => c[1]) : [columns[0][1], columns[1][1], 1 - columns[0][1] - columns[1][1]];
    ctx.fillStyle = row.status === "failed" ? "#e77" : done ? "#ddd" : "#aaa";
    let cx = 10;
    cells.forEach((cell, c) => {
      const w = shares[c] * width;
      ctx.fillText(clip(ctx, cell, w - 4), cx, y);
      cx += w;
    });
  });
  if (rows.length > MAX_ROWS) {
    ctx.fillStyle = "#999";
    ctx.fillText(`… ${rows.length - MAX_ROWS} more in the report`, 10, top + HEADER + MAX_ROWS * ROW + 6);
  }
  ctx.restore();
}

app.registerExtension({
  name: "comfyui-lora-resize.folder",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const table = message?.lora_resize_folder?.[0];
      if (!table) return;
      this.loraResizeFolder = table;
      const needed = tableTop(this) + tableHeight(table);
      if (this.size[1] < needed || this.size[0] < 520) {
        this.setSize([Math.max(this.size[0], 520), Math.max(this.size[1], needed)]);
      }
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (this.loraResizeFolder && !this.flags?.collapsed) drawTable(ctx, this, this.loraResizeFolder);
    };
  },
});
