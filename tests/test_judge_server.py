"""wb judge's grid loading, votes.jsonl, the HTTP server and the CLI, on a fake grid folder."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from judge_grid import write_fake_grid
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.judge.server import make_server
from workbench.judge.session import Judge, load_grid, load_grids, safe_path
from workbench.judge.votes import VoteLog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def grid(tmp_path):
    return write_fake_grid(tmp_path / "grid")


@pytest.fixture
def server(grid):
    srv = make_server(Judge(load_grids([grid]), who="tester", seed=0), port=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, headers=None):
    """One raw HTTP request (the path is sent exactly as given, `..` included)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=hdrs)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def lines(grid):
    return [json.loads(line) for line in (grid / "votes.jsonl").read_text().splitlines()]


# -- loading ---------------------------------------------------------------------------------------


def test_pairs_are_the_same_prompt_and_seed_with_different_checkpoints(grid):
    g = load_grid(grid)
    assert g.by == "checkpoint" and g.items == ["base", "v4", "dadapt"]
    assert len(g.groups) == 4  # 2 prompts x 2 seeds
    for members in g.groups.values():
        cells = [g.cells[i] for i in members.values()]
        assert len({(c["prompt"], c["seed"]) for c in cells}) == 1
        assert sorted(c["checkpoint"] for c in cells) == ["base", "dadapt", "v4"]


def test_by_another_axis_and_bad_grids(grid, tmp_path):
    assert load_grid(grid, by="seed").items == ["Seed: 1", "Seed: 2"]
    axes = r"its axes: checkpoint, prompt, seed"
    with pytest.raises(WorkbenchError, match=rf"--by cfg: .* has no cfg axis \({axes}\)"):
        load_grid(grid, by="cfg")
    with pytest.raises(WorkbenchError, match=r"grid.json: not found; give a folder written by wb grid"):
        load_grid(tmp_path)
    (grid / "cells" / "0003.png").unlink()
    with pytest.raises(WorkbenchError, match=r"cells\[3\].file 'cells/0003.png': no such image"):
        load_grid(grid)
    one = write_fake_grid(tmp_path / "one", checkpoints=("only",))
    with pytest.raises(WorkbenchError, match="one checkpoint only; nothing to compare"):
        load_grid(one)


def test_safe_path_refuses_everything_outside_the_folder(grid, tmp_path):
    assert safe_path(grid, "cells/0000.png") == (grid / "cells" / "0000.png").resolve()
    (tmp_path / "secret.png").write_bytes(b"x")
    (grid / "cells" / "link.png").symlink_to(tmp_path / "secret.png")
    for bad in ("../secret.png", "cells/../../secret.png", "/etc/passwd", "//etc/passwd", "C:/x.png",
                "cells\\..\\..\\secret.png", "cells//0000.png", "", "cells/0000.png\0", "cells/link.png"):
        assert safe_path(grid, bad) is None, bad


# -- votes.jsonl -----------------------------------------------------------------------------------


def test_a_line_cut_short_by_a_crash_is_skipped_and_the_next_vote_starts_a_fresh_line(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    log.append({"id": "a", "choice": "left"})
    with open(log.path, "ab") as f:
        f.write(b'{"id": "b", "cho')  # killed mid-write: never acknowledged
    log.append({"id": "c", "choice": "same"})
    log.append({"undo": "a"})
    contents = log.read()
    assert [v["id"] for v in contents.votes] == ["c"]
    assert (contents.bad_lines, contents.undone) == (1, 1)


def test_two_writers_at_once_never_interleave(tmp_path):
    log = VoteLog(tmp_path / "votes.jsonl")
    other = VoteLog(tmp_path / "votes.jsonl")  # a second server on the same grid: its own lock
    def write(which, k):
        for n in range(40):
            which.append({"id": f"{k}-{n}", "pad": "x" * 2000})
    threads = [threading.Thread(target=write, args=(log if k % 2 else other, k)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw = log.path.read_text().splitlines()
    assert len(raw) == 240 and len({json.loads(line)["id"] for line in raw}) == 240


# -- the server ------------------------------------------------------------------------------------


def test_pages_and_a_vote_through_http(server, grid):
    status, page = request(server, "GET", "/")
    assert status == 200 and b"/static/judge.js" in page and b"http" not in page.replace(b"http-equiv", b"")
    assert request(server, "GET", "/ranking")[0] == 200
    assert request(server, "GET", "/static/judge.js")[0] == 200
    status, raw = request(server, "GET", "/api/pair")
    pair = json.loads(raw)
    g = load_grid(grid)
    left, right = g.cells[pair["left"]["index"]], g.cells[pair["right"]["index"]]
    assert (left["prompt"], left["seed"]) == (right["prompt"], right["seed"])
    assert left["checkpoint"] != right["checkpoint"]
    assert "checkpoint" not in raw.decode() and left["checkpoint"] not in raw.decode()  # blind
    status, image = request(server, "GET", pair["left"]["url"])
    assert status == 200 and image == (grid / left["file"]).read_bytes()

    vote = {"grid": pair["grid"], "left": left["index"], "right": right["index"], "choice": "right"}
    status, raw = request(server, "POST", "/api/vote", vote)
    assert status == 200
    ack = json.loads(raw)
    [record] = lines(grid)
    assert record["id"] == ack["id"] and record["choice"] == "right" and record["who"] == "tester"
    assert record["left"] == {"index": left["index"], "file": left["file"], "item": left["checkpoint"]}
    assert record["right"]["item"] == right["checkpoint"] and record["when"].endswith("Z")

    status, raw = request(server, "POST", "/api/undo", {"grid": "0", "id": ack["id"]})
    assert status == 200 and lines(grid)[-1]["undo"] == ack["id"]
    status, raw = request(server, "POST", "/api/undo", {"grid": "0", "id": ack["id"]})
    assert status == 400 and b"already undone" in raw
    assert json.loads(request(server, "GET", "/api/ranking")[1])["grids"][0]["votes"] == 0


@pytest.mark.parametrize("path", [
    "/g/0/../grid.json", "/g/0/../../../etc/passwd", "/g/0/%2e%2e/%2e%2e/etc/passwd", "/g/0//etc/passwd",
    "/g/0/%2Fetc%2Fpasswd", "/g/0/grid.json", "/g/0/cells/../../grid/cells/0000.png", "/g/1/cells/0000.png",
    "/g/0/cells/%00.png", "/../etc/passwd", "/static/../session.py",
])  # fmt: skip
def test_traversal_is_refused(server, path):
    status, body = request(server, "GET", path)
    assert status == 404 and b"root:" not in body and b"cells" not in body


def test_a_link_out_of_the_folder_is_refused(server, grid, tmp_path):
    (tmp_path / "outside.png").write_bytes(b"\x89PNG secret")
    (grid / "cells" / "out.png").symlink_to(tmp_path / "outside.png")
    assert request(server, "GET", "/g/0/cells/out.png")[0] == 404


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{not json", None, 400, b"not JSON"),
    (b"[1, 2]", None, 400, b"JSON object"),
    ({"grid": "0", "left": 0, "right": 1}, None, 400, b"choice must be one of left, right, same"),
    ({"grid": "0", "left": 0, "right": 1, "choice": "both"}, None, 400, b"choice"),
    ({"grid": "0", "left": 0, "right": 1, "choice": ["left"]}, None, 400, b"choice"),
    ({"grid": {"a": 1}, "left": 0, "right": 1, "choice": "left"}, None, 400, b"grid must be"),
    ({"grid": "7", "left": 0, "right": 1, "choice": "left"}, None, 400, b"grid must be one of 0"),
    ({"grid": "0", "left": "0", "right": 1, "choice": "left"}, None, 400, b"left must be a cell index"),
    ({"grid": "0", "left": True, "right": 1, "choice": "left"}, None, 400, b"left must be a cell index"),
    ({"grid": "0", "left": 0, "right": 99, "choice": "left"}, None, 400, b"right must be a cell index"),
    ({"grid": "0", "left": 0, "right": 0, "choice": "left"}, None, 400, b"not a pair"),
    ({"grid": "0", "left": 0, "right": 4, "choice": "left"}, None, 400, b"not a pair"),  # other prompt
    ({"grid": "0", "left": 0, "right": 1, "choice": "left", "who": ["x"]}, None, 400, b"who must be"),
    ({"grid": "0", "left": 0, "right": 1, "choice": "left"}, {"Content-Type": "text/plain"}, 415, b"json"),
    ({"grid": "0", "left": 0, "right": 1, "choice": "left"}, {"Host": "evil.example:80"}, 403, b"Host"),
])  # fmt: skip
def test_a_malformed_vote_is_a_400_and_the_server_carries_on(server, grid, body, headers, status, message):
    got, raw = request(server, "POST", "/api/vote", body, headers)
    assert got == status and message in raw
    assert not (grid / "votes.jsonl").exists()
    ok = {"grid": "0", "left": 0, "right": 1, "choice": "left"}
    assert request(server, "POST", "/api/vote", ok)[0] == 200


def test_an_oversized_body_is_refused(server, grid):
    status, _ = request(server, "POST", "/api/vote", b"{" + b" " * 70_000 + b"}")
    assert status == 413 and not (grid / "votes.jsonl").exists()


def test_votes_from_many_tabs_at_once_all_land(server, grid):
    def tab(k):
        for n in range(10):
            choice = ("left", "right", "same")[(k + n) % 3]
            assert request(server, "POST", "/api/vote", {"grid": "0", "left": 0, "right": 2, "choice": choice,
                                                         "who": f"tab{k}"})[0] == 200  # fmt: skip
    threads = [threading.Thread(target=tab, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = lines(grid)
    assert len(records) == 60 and len({r["id"] for r in records}) == 60


def test_pairs_cover_every_pair_of_checkpoints_and_every_setting(server):
    seen_items, seen_cells = set(), set()
    g = server.judge.grids["0"]
    for _ in range(12):
        pair = json.loads(request(server, "GET", "/api/pair")[1])
        left, right = pair["left"]["index"], pair["right"]["index"]
        seen_items.add(frozenset((g.item_of[left], g.item_of[right])))
        seen_cells.update((left, right))
        request(server, "POST", "/api/vote", {"grid": "0", "left": left, "right": right, "choice": "same"})
    assert len(seen_items) == 3  # base-v4, base-dadapt, v4-dadapt
    assert {g.cells[i]["seed"] for i in seen_cells} == {1, 2}
    assert {g.cells[i]["prompt"] for i in seen_cells} == {"a red circle", "a blue square"}


# -- the CLI ---------------------------------------------------------------------------------------


def test_a_killed_server_loses_no_acknowledged_vote(grid):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "workbench.cli", "judge", str(grid), "--port", "0"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    try:
        url = None
        deadline = time.time() + 60
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            url = m and int(m[1])
        assert url, "the server never said where it listens"
        conn_server = type("S", (), {"server_address": ("127.0.0.1", url)})
        acked = []
        for n in range(20):
            vote = {"grid": "0", "left": 3 + n % 3, "right": 3 + (n + 1) % 3, "choice": "left"}
            status, raw = request(conn_server, "POST", "/api/vote", vote)
            assert status == 200
            acked.append(json.loads(raw)["id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.stdout.close()
    assert [r["id"] for r in lines(grid)] == acked


def test_report_prints_the_ranking_and_writes_ranking_json(grid, tmp_path):
    other = write_fake_grid(tmp_path / "mixes", checkpoints=("mix_a", "mix_b"))
    log = VoteLog(grid / "votes.jsonl")
    g = load_grid(grid)
    cell = {item: g.groups[(0, 0)][k] for k, item in enumerate(g.items)}
    # dadapt beats both 6 times, v4 beats base 4 of 6 times.
    plan = [("dadapt", "base", "left")] * 6 + [("v4", "dadapt", "right")] * 6
    plan += [("base", "v4", "right")] * 4 + [("base", "v4", "left")] * 2
    for n, (a, b, choice) in enumerate(plan):
        left, right = {"index": cell[a], "item": a}, {"index": cell[b], "item": b}
        log.append({"id": str(n), "left": left, "right": right, "choice": choice})
    result = CliRunner().invoke(app, ["judge", str(grid), str(other), "--report"])
    assert result.exit_code == 0, result.output
    assert "dadapt is best with" in result.output and "too few votes" in result.output
    data = json.loads((grid / "ranking.json").read_text())
    assert [it["name"] for it in data["items"]] == ["dadapt", "v4", "base"]
    assert data["votes"] == 18 and data["items"][0]["wins"] == 12 and data["items"][0]["votes"] == 12
    wins = dict(zip(data["win_matrix"]["names"], data["win_matrix"]["wins"], strict=True))
    assert wins["v4"] == [0, 0, 4] and wins["base"] == [0, 2, 0]
    # burn of the fake grid: base 30, v4 31, dadapt 32; the humans prefer the most burnt: against
    # "low burn is better" their order is exactly reversed.
    assert data["correlation"]["burn"] == pytest.approx(-1.0) and data["correlation"]["clip"] is None
    assert json.loads((other / "ranking.json").read_text())["votes"] == 0


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["judge", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope: not a folder" in result.output


def test_host_warns(grid, monkeypatch):
    import workbench.judge.server as server_module

    class Stop(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(server_module.JudgeServer, "serve_forever", lambda self: refuse())
    result = CliRunner().invoke(app, ["judge", str(grid), "--host", "0.0.0.0", "--port", "0"])
    assert isinstance(result.exception, Stop)
    assert "warning:" in result.output and "exposes the voting page" in result.output


def test_acceptance_thirty_votes_for_dadapt_through_http(tmp_path):
    # The acceptance on a grid shaped like the demo's (six models, two prompts, two seeds):
    # 30 votes through the server's own pairs, always for dadapt, a coin flip between the others.
    models = ("base", "v4", "dadapt", "v4_dadapt", "v4_plus_dadapt_delta", "kitchen_sink")
    grid = write_fake_grid(tmp_path / "grid", checkpoints=models)
    srv = make_server(Judge(load_grids([grid]), seed=11), port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        g = srv.judge.grids["0"]
        coin = iter([0, 1, 1, 0, 1, 0, 0, 1] * 10)
        for _ in range(30):
            pair = json.loads(request(srv, "GET", "/api/pair")[1])
            left, right = (g.items[g.item_of[pair[s]["index"]]] for s in ("left", "right"))
            if "dadapt" in (left, right):
                choice = "left" if left == "dadapt" else "right"
            else:
                choice = ("left", "right")[next(coin)]
            vote = {"grid": "0", "choice": choice, **{s: pair[s]["index"] for s in ("left", "right")}}
            assert request(srv, "POST", "/api/vote", vote)[0] == 200
        ranking = json.loads(request(srv, "GET", "/api/ranking")[1])["grids"][0]
    finally:
        srv.shutdown()
        srv.server_close()
    top, *rest = ranking["items"]
    assert ranking["votes"] == 30 and top["name"] == "dadapt"
    assert top["low"] > max(it["high"] for it in rest)
    assert ranking["sentence"].startswith("dadapt is best with")
    assert ranking["sentence"].endswith("its 90% interval lies above every other's")


def test_a_port_in_use_is_one_line(grid):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["judge", str(grid), "--port", str(port)])
    assert result.exit_code == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in result.output


def test_several_grids_in_one_sitting(tmp_path):
    four = write_fake_grid(tmp_path / "a" / "grid", checkpoints=("c1", "c2", "c3", "c4"))
    three = write_fake_grid(tmp_path / "b" / "grid", checkpoints=("mix1", "mix2", "mix3"))
    grids = load_grids([four, three])
    assert [g.name for g in grids] == ["a/grid", "b/grid"]  # same folder name: the parent tells apart
    judge = Judge(grids, seed=0)
    shown = []
    for _ in range(12):
        pair = judge.next_pair()
        shown.append(pair["grid"])
        judge.vote({"grid": pair["grid"], "left": pair["left"]["index"], "right": pair["right"]["index"],
                    "choice": "same"})  # fmt: skip
    # The grid with fewer votes per pair goes next: 6 pairs against 3, so about 2 votes to 1.
    assert shown.count("0") == 8 and shown.count("1") == 4
    assert len(lines(four)) == 8 and len(lines(three)) == 4
    assert {r["left"]["item"] for r in lines(three)} <= {"mix1", "mix2", "mix3"}
    with pytest.raises(WorkbenchError, match="the same grid folder is given twice"):
        load_grids([four, four])
