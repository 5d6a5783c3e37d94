"""wb judge in a real browser: headless Chromium votes with the keyboard, then reads the ranking page.

Needs Debian's `chromium` and `chromium-driver` packages (CI installs them: .ci/run) and selenium
(the `test` extra); without them the test is skipped and says why.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
from judge_grid import write_fake_grid

from workbench.judge.server import make_server
from workbench.judge.session import Judge, load_grids

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs a headless Chromium and its driver: apt-get install chromium chromium-driver",
)


def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,800", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_vote_with_the_keyboard_then_read_the_ranking(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    grid = write_fake_grid(tmp_path / "grid", checkpoints=("base", "v4", "dadapt", "kitchen_sink"))
    judge = Judge(load_grids([grid]), who="selenium", seed=1)
    server = make_server(judge, port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    g = judge.grids["0"]
    try:
        driver = browser()
    except Exception as e:  # noqa: BLE001 - a broken install is a skip with its reason, not a failure
        server.shutdown()
        pytest.skip(f"chromium would not start: {e}")
    wait = WebDriverWait(driver, 20, poll_frequency=0.05)

    def ready():
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

    def shown(side):
        src = driver.find_element(By.ID, f"{side}-img").get_attribute("src")
        file = src.split("/g/0/", 1)[1]
        return next(c for c in g.cells if c["file"] == file)

    def count():
        path = grid / "votes.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    try:
        driver.get(server.url)
        keys = []
        for n in range(15):
            ready()
            left, right = shown("left"), shown("right")
            assert left["checkpoint"] != right["checkpoint"]
            assert (left["prompt"], left["seed"]) == (right["prompt"], right["seed"])
            assert "dadapt" not in driver.find_element(By.TAG_NAME, "body").text  # blind
            # Always dadapt; otherwise the earlier name in the alphabet, or "same" every third time.
            if "dadapt" in (left["checkpoint"], right["checkpoint"]):
                key = "1" if left["checkpoint"] == "dadapt" else "2"
            elif n % 3 == 0:
                key = Keys.SPACE
            else:
                key = "1" if left["checkpoint"] < right["checkpoint"] else "2"
            before = count()
            driver.find_element(By.TAG_NAME, "body").send_keys(key)
            wait.until(lambda d, before=before: count() == before + 1)
            keys.append(key)
        ready()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.BACKSPACE)  # take the last vote back
        wait.until(lambda d: count() == 16)
        records = [json.loads(line) for line in (grid / "votes.jsonl").read_text().splitlines()]
        assert records[-1]["undo"] == records[-2]["id"]
        assert {r["choice"] for r in records[:-1]} == {"left", "right", "same"}
        assert all(r["who"] == "selenium" for r in records[:-1])

        driver.get(server.url + "ranking")
        ready()
        rows = driver.find_elements(By.CSS_SELECTOR, "table.rank tr.item")
        names = [row.find_elements(By.TAG_NAME, "td")[1].text for row in rows]
        assert names[0] == "dadapt" and sorted(names) == ["base", "dadapt", "kitchen_sink", "v4"]
        sentence = driver.find_element(By.CSS_SELECTOR, "p.sentence").text
        assert sentence.startswith("dadapt is best with")
        assert "14 votes" in driver.find_element(By.CSS_SELECTOR, "section.grid h2").text
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
