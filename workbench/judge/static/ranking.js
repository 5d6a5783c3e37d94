// The ranking page: one section per grid, built from /api/ranking (the same data as ranking.json).
"use strict";
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
};
const fmt = (v, digits = 2) => (v === null || v === undefined) ? "-"
  : Number(v).toFixed(digits).replace(/^-(0\.0*)$/, "$1");  // no "-0.00"
const pct = v => v > 0.995 && v < 1 ? ">99%" : v > 0 && v < 0.005 ? "<1%" : Math.round(100 * v) + "%";

function intervalBar(item, lo, hi) {
  // A strip from the smallest low to the largest high: the interval as a bar, the strength a tick.
  const x = v => (100 * (v - lo) / ((hi - lo) || 1)).toFixed(1) + "%";
  const bar = el("div", {class: "bar"});
  const span = el("span", {class: "span"});
  span.style.left = x(item.low);
  span.style.width = `calc(${x(item.high)} - ${x(item.low)})`;
  const tick = el("span", {class: "tick"});
  tick.style.left = x(item.strength);
  bar.append(span, tick);
  return bar;
}

function section(grid) {
  const box = el("section", {class: "grid", "data-name": grid.name});
  box.append(el("h2", {}, `${grid.name} `, el("span", {class: "note"}, `(${grid.by}, ${grid.votes} votes)`)));
  box.append(el("p", {class: "sentence"}, grid.sentence));
  const level = Math.round(100 * grid.level);
  const table = el("table", {class: "rank"});
  const head = ["rank", grid.by, "strength", `${level}% interval`, "", "P(best)", "votes", "wins", "ties",
                "burn", "CLIP"];
  table.append(el("thead", {}, el("tr", {}, ...head.map(h => el("th", {}, h)))));
  const body = el("tbody");
  const lo = Math.min(...grid.items.map(i => i.low)), hi = Math.max(...grid.items.map(i => i.high));
  for (const item of grid.items) {
    body.append(el("tr", {class: "item"},
      el("td", {class: "num"}, String(item.rank)), el("td", {class: "name"}, item.name),
      el("td", {class: "num"}, fmt(item.strength)),
      el("td", {class: "num"}, `${fmt(item.low)} .. ${fmt(item.high)}`),
      el("td", {}, intervalBar(item, lo, hi)),
      el("td", {class: "num"}, pct(item.p_best)), el("td", {class: "num"}, String(item.votes)),
      el("td", {class: "num"}, String(item.wins)), el("td", {class: "num"}, String(item.ties)),
      el("td", {class: "num"}, fmt(item.burn)), el("td", {class: "num"}, fmt(item.clip))));
  }
  table.append(body);
  box.append(table);
  const c = grid.correlation;
  box.append(el("p", {class: "note"},
    `Rank correlation (Spearman) of the human strength with low burn: ${fmt(c.burn)}, with CLIP: ${fmt(c.clip)}.`));
  const m = grid.win_matrix;
  box.append(el("p", {class: "note matrix-note"},
    "Wins of the row against the column (a \"same\" vote counts half each way):"));
  const matrix = el("table", {class: "matrix"});
  matrix.append(el("tr", {}, el("th", {}, ""), ...m.names.map(n => el("th", {}, n))));
  m.wins.forEach((row, i) => matrix.append(el("tr", {}, el("th", {}, m.names[i]),
    ...row.map((w, j) => el("td", {class: i === j ? "num self" : "num"}, i === j ? "" : String(w))))));
  box.append(matrix);
  return box;
}

async function load() {
  const box = document.getElementById("grids");
  try {
    const response = await fetch("/api/ranking");
    const data = await response.json();
    document.getElementById("method").textContent = data.method;
    box.replaceChildren(...data.grids.map(section));
    document.body.dataset.ready = "1";
  } catch (e) {
    box.replaceChildren(el("p", {class: "bad"}, "could not load the ranking: " + e.message));
  }
}
document.getElementById("refresh").addEventListener("click", load);
load();
