"""index.html: a static page beside grid.png, with no external assets.

It shows the grid, then one row per cell (its image, its parameters, its scores) in a table that
sorts by any column when its header is clicked (a few lines of inline JavaScript). Images are
linked relatively (grid.png, cells/NNNN.png), so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

from html import escape

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
img.grid { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; text-align: left; }
th[data-col] { cursor: pointer; background: #f4f4f4; user-select: none; }
th[data-dir=asc]::after { content: " \\25B2"; }
th[data-dir=desc]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td pre { margin: 0; white-space: pre-wrap; max-width: 40em; font-size: 12px; }
td img { width: 96px; image-rendering: auto; }
.note { color: #666; }
"""

# Click a header to sort by it; click again to reverse. Cells carry data-v for numeric sorting.
_SCRIPT = """
document.querySelectorAll("th[data-col]").forEach(th => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], col = +th.dataset.col;
  const asc = th.dataset.dir !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? "asc" : "desc";
  const key = row => { const c = row.cells[col], n = parseFloat(c.dataset.v);
                       return isNaN(n) ? c.textContent : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
                                  return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); })
    .forEach(row => body.appendChild(row));
}));
"""


def _num(value, digits: int = 2) -> str:
    if value is None:
        return '<td class="num" data-v="-1">-</td>'
    shown = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f'<td class="num" data-v="{value}">{escape(shown)}</td>'


def _axis_label(data: dict, position: str, cell: dict) -> str:
    axis = data["axes"].get(position)
    return axis["labels"][cell[position]] if axis else ""


def build_html(data: dict, title: str = "wb grid", intro_html: str = "") -> str:
    """The page for a grid.json dict (see workbench/grids/run.py for its fields).

    `data["score_names"]` (default burn, CLIP) picks the score columns; `intro_html` is trusted
    markup placed above the grid (the swap matrix puts its verdict there)."""
    axes = [(p, a) for p, a in data["axes"].items() if a]
    score_names = data.get("score_names", ["burn", "clip"])
    axis_text = ", ".join(f"{p.upper()}: {a['kind']}" for p, a in axes) or "a single cell"
    headers = ["image", "#", *[p.upper() for p, _ in axes], "checkpoint", "seed", "CFG", "steps",
               "sampler", *[n if n != "clip" else "CLIP" for n in score_names], "parameters"]  # fmt: skip
    head = "".join(f'<th data-col="{i}">{escape(h)}</th>' for i, h in enumerate(headers))
    rows = []
    for cell in data["cells"]:
        scores = cell["scores"]
        file, cell_hash = escape(cell["file"]), escape(cell["model_hash"] or "no hash")
        tds = [
            f'<td><a href="{file}"><img src="{file}" alt="cell {cell["index"]}"></a></td>',
            _num(cell["index"]),
            *[f"<td>{escape(_axis_label(data, p, cell))}</td>" for p, _ in axes],
            f'<td>{escape(cell["checkpoint"])}<br><span class="note">{cell_hash}</span></td>',
            _num(cell["seed"]),
            _num(cell["cfg"], 1),
            _num(cell["steps"]),
            f"<td>{escape(cell['sampler'])}</td>",
            *[_num(scores.get(n)) for n in score_names],
            f"<td><pre>{escape(cell['parameters'])}</pre></td>",
        ]  # fmt: skip
        rows.append("<tr>" + "".join(tds) + "</tr>")
    width, height = data["size"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(title)}: {escape(axis_text)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
{intro_html}
<p>{len(data["cells"])} cells; {escape(axis_text)}. Burn score: {escape(data["scores"]["burn"])}.
<br><span class="note">{escape(data["scores"]["note"])}</span></p>
<p><a href="grid.png"><img class="grid" src="grid.png" width="{width}" height="{height}"
  alt="the grid"></a></p>
<p class="note">Click a column header to sort.</p>
<table><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""
