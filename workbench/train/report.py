"""RUNDIR/index.html: one static page a person opens to see how a run went.

Built from what the run folder already holds (run.json, metrics.jsonl, loss.png, checkpoints/,
samples/), so it can be rebuilt at any time and never disagrees with the files: how the run ended,
the loss plot, the best validation loss, the checkpoints, the sample images by step, and the
resolved recipe and package versions. No scripts, no external assets.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from workbench.train.runs import read_metrics, read_run

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
img { border: 1px solid #ddd; image-rendering: pixelated; }
img.plot { max-width: 100%; image-rendering: auto; }
.samples img { width: 128px; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; }
.message { font-size: 1.15em; font-weight: bold; }
"""


def write_run_report(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    page = run_report_html(run_dir)
    out = run_dir / "index.html"
    tmp = run_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def run_report_html(run_dir: Path) -> str:
    e = html.escape
    record = read_run(run_dir)
    metrics = read_metrics(run_dir)
    events = [m for m in metrics if "event" in m]
    ends = ("finished", "stopped", "interrupted")
    end = next((m for m in reversed(events) if m["event"] in ends), None)
    message = end.get("message", end["event"]) if end else "running (or killed before it could say)"
    val = [(m["step"], m["loss/val"]) for m in metrics if "loss/val" in m]
    best = min(val, key=lambda p: p[1]) if val else None
    data = record.get("data", {})
    facts = {
        "base": f"{record.get('base', {}).get('path')} ({record.get('base', {}).get('architecture')})",
        "data": f"{data.get('root')}: {data.get('train')} training, {data.get('validation')} held out",
        "steps": f"{data.get('total_steps')} planned, {data.get('steps_per_epoch')} per epoch",
        "best loss/val": f"{best[1]:.5f} at step {best[0]}" if best else None,
        "device": record.get("device", {}).get("name"),
        "started": record.get("started"),
        "resumed": ", ".join(f"at step {r['from_step']} ({r['time']})" for r in record.get("resumes", [])),
        "wb": (record.get("wb") or {}).get("version"),
    }
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts.items() if v)
    checkpoints = sorted((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []
    ckpt_rows = "".join(
        f'<tr><td><a href="checkpoints/{e(p.name)}">{e(p.name)}</a></td>'
        f"<td>{'folder (diffusers)' if p.is_dir() else f'{p.stat().st_size / 2**20:.1f} MiB'}</td></tr>"
        for p in checkpoints
        if not p.name.startswith(".")
    )
    samples = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    by_step: dict[str, list[Path]] = {}
    for p in samples:
        by_step.setdefault(p.name.split("-", 1)[0], []).append(p)
    sample_rows = "".join(
        f"<tr><th>step {int(step[2:])}</th><td class='samples'>"
        + "".join(f'<img src="samples/{e(p.name)}" alt="{e(p.name)}" title="{e(p.name)}">' for p in paths)
        + "</td></tr>"
        for step, paths in by_step.items()
    )
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items() if v)
    recipe = json.dumps(record.get("recipe", {}), indent=2)
    plot = ""
    if (run_dir / "loss.png").is_file():
        plot = '<img class="plot" src="loss.png" alt="loss against step">'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wb train: {e(run_dir.name)}</title>
<style>{STYLE}</style></head><body>
<h1>{e(run_dir.name)}</h1>
<p class="message">{e(message)}</p>
{plot}
<table>{fact_rows}</table>
<h2>Checkpoints</h2>
{f"<table>{ckpt_rows}</table>" if ckpt_rows else "<p>none</p>"}
{f"<h2>Samples</h2><table>{sample_rows}</table>" if sample_rows else ""}
<h2>Recipe (resolved)</h2>
<pre>{e(recipe)}</pre>
<p>Versions: {e(versions)}</p>
<p>Everything here comes from run.json and metrics.jsonl; compare two runs with
<code>wb runs diff</code>.</p>
</body></html>
"""
