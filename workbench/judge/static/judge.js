// The voting page: show a pair, send the vote, show the next. No labels, no external assets.
"use strict";
let pair = null;       // the pair on screen
let busy = false;      // a request is in flight: ignore keys, so one press is one vote
const done = [];       // {grid, id} of this tab's votes, for undo
const $ = id => document.getElementById(id);

const who = $("who");
who.value = localStorage.getItem("wb-judge-who") || "";
who.addEventListener("change", () => localStorage.setItem("wb-judge-who", who.value.trim()));

function say(text, bad) {
  $("status").textContent = text;
  $("status").className = bad ? "note bad" : "note";
}

async function call(method, url, body) {
  const options = {method, headers: {}};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function next() {
  busy = true;
  try {
    pair = await call("GET", "/api/pair");
    await Promise.all(["left", "right"].map(side => new Promise(resolve => {
      const img = $(side + "-img");
      img.onload = () => { img.classList.toggle("upscaled", img.naturalWidth < 256); resolve(); };
      img.onerror = resolve;
      img.src = pair[side].url;
    })));
    $("context").textContent = pair.context;
    $("count").textContent = pair.votes + " votes";
    document.body.dataset.ready = "1";
  } catch (e) {
    say("could not load a pair: " + e.message, true);
  } finally {
    busy = false;
  }
}

async function vote(choice) {
  if (busy || !pair) return;
  busy = true;
  document.body.dataset.ready = "0";
  try {
    const result = await call("POST", "/api/vote", {
      grid: pair.grid, left: pair.left.index, right: pair.right.index, choice, who: who.value.trim(),
    });
    done.push({grid: result.grid, id: result.id});
    say("saved: " + choice);
  } catch (e) {
    say("vote NOT saved: " + e.message, true);
    busy = false;
    document.body.dataset.ready = "1";
    return;
  }
  busy = false;
  await next();
}

async function undo() {
  if (busy) return;
  const last = done.pop();
  if (!last) { say("nothing to undo in this tab"); return; }
  busy = true;
  try {
    await call("POST", "/api/undo", {grid: last.grid, id: last.id, who: who.value.trim()});
    say("undone: your last vote");
  } catch (e) {
    done.push(last);
    say("undo failed: " + e.message, true);
  } finally {
    busy = false;
  }
  await next();
}

$("left").addEventListener("click", () => vote("left"));
$("right").addEventListener("click", () => vote("right"));
$("same").addEventListener("click", () => vote("same"));
$("undo").addEventListener("click", undo);
document.addEventListener("keydown", event => {
  if (event.target === who || event.altKey || event.ctrlKey || event.metaKey) return;
  const keys = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "0": "same", " ": "same"};
  if (event.key in keys) { event.preventDefault(); vote(keys[event.key]); }
  else if (event.key === "Backspace") { event.preventDefault(); undo(); }
});
next();
