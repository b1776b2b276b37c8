"""tailor studio in a real browser (Chromium driven by Playwright): a table to a fine-tuned, compared, chatted-with
and exported model, asserting what each page shows. Screenshots of every step go to $STUDIO_SCREENSHOTS (the
README's come from there) or the test's own folder."""
import os
import shutil
from pathlib import Path

import pytest

from conftest import labeled_csv
from tailorlm.serve.server import BackgroundServer
from tailorlm.studio.app import create_app
from tailorlm.studio.paths import Folders
from tailorlm.studio.state import Studio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which a closed
# network refuses; --no-sandbox because CI runs as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def browser_page():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page, errors
        browser.close()


def test_a_table_to_a_fine_tuned_compared_and_exported_model_in_the_browser(tmp_path, tiny_model_dir, browser_page):
    page, errors = browser_page
    shots = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    table = labeled_csv(tmp_path / "source.csv", n_per_label=20).read_text().replace("text,label", "review,sentiment", 1)
    (tmp_path / "reviews.csv").write_text(table)  # uploaded from outside the data folder, as from a download folder
    # STUDIO_MODEL=default takes the screenshots with the real embedded model (the README's); the tiny random
    # model answers noise, but walks every page the same way in a fraction of the time
    model = os.environ.get("STUDIO_MODEL") or "tiny-llama"
    shutil.copytree(tiny_model_dir, data / "tiny-llama")
    studio = Studio(Folders(tmp_path / "home", tmp_path / "runs", [data]))
    with BackgroundServer(create_app(studio)) as server:
        base = f"http://127.0.0.1:{server.port}"

        def visit(path: str):
            page.goto(base + path)
            page.wait_for_selector("body[data-ready='1']", state="attached", timeout=120_000)

        def shot(name: str):
            page.wait_for_timeout(300)
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        # 1. data: upload, first rows, column mapping
        visit("/data")
        page.set_input_files("#upload", str(tmp_path / "reviews.csv"))
        page.wait_for_selector("#rows tr:nth-child(2)")
        assert page.inner_text("#row-count") == "(40 rows; 20 shown)"
        assert page.inner_text("#rows tr:first-child").split() == ["review", "sentiment"]
        page.select_option('select[data-field="text"]', "review")
        page.wait_for_function("document.querySelector('#yaml').textContent.includes('text: review')")
        page.select_option('select[data-field="label"]', "sentiment")
        page.wait_for_function("document.querySelector('#yaml').textContent.includes('label: sentiment')")
        shot("1-data")

        # 4 (settings first, so the previews tokenize with this model): the model and a short run
        visit("/train")
        # enough steps that the page, polling each second, sees the curve grow while the run goes on
        steps, every = ("150", "25") if model == "tiny-llama" else ("30", "10")
        for key, value in {"model.path": model, "train.max_steps": steps, "train.batch_size": "4",
                           "train.eval_every": every, "output.name": "reviews"}.items():
            page.fill(f'[data-key="{key}"]', value)
            page.dispatch_event(f'[data-key="{key}"]', "change")
            page.wait_for_function(f"document.querySelector('#yaml').textContent.includes({value!r})", timeout=60_000)
        page.select_option("#baselines", "zero_shot")  # and no k-shot curve with it, as the YAML says
        page.wait_for_function("document.querySelector('#yaml').textContent.includes('few_shot_k:\\n  - 0\\n')")
        assert "- few_shot" not in page.inner_text("#yaml")
        assert page.inner_text("#machine").startswith("This machine: ")
        assert page.locator("#models option").count() >= 1  # the tiny model in the data folder, at least
        assert page.get_attribute('[data-key="train.max_steps"] >> xpath=..', "title").startswith("train.max_steps: ")

        # 2. template: rendered samples with the trained tokens highlighted, the length histogram
        visit("/template")
        page.wait_for_selector("#samples pre.sample")
        trained = page.eval_on_selector_all("#samples .loss", "spans => spans.map(s => s.textContent)")
        assert len(trained) == 3 and all(t.split("<")[0] in ("positive", "negative") for t in trained)
        context = page.inner_text("#samples pre.sample >> nth=0")
        assert "Answer with one of: negative, positive." in context
        assert page.locator("#histogram .bar").count() >= 1
        assert "Examples: 28 train, 4 validation, 8 test." in page.inner_text("#length-facts")
        shot("2-template")

        # 3. preflight: the CLI's findings and the time estimate
        visit("/preflight")
        page.wait_for_selector("#findings tr:nth-child(2)")
        checks = page.eval_on_selector_all("#findings tr td:nth-child(2)", "cells => cells.map(c => c.textContent)")
        assert {"rows", "duplicates", "leakage", "length", "time"} <= set(checks)
        assert page.inner_text("#estimate").startswith("Estimated training time: ")
        shot("3-preflight")

        # 4. train: start (pressed twice: one run), watch the step counter and the live curve grow, until it completes
        visit("/train")
        page.wait_for_function("document.querySelector('#estimate').textContent.startsWith('Estimated training time')",
                               timeout=120_000)
        page.click("#start")
        page.click("#start", force=True)  # the button is disabled while the first press is answered
        again = page.evaluate("fetch('/api/runs', {method: 'POST', headers: {'X-Studio': '1'}})"
                              ".then(async r => [r.status, (await r.json()).error])")
        assert again[0] == 409 and again[1].startswith("this draft is already"), again
        page.wait_for_function("document.querySelector('#live-status').textContent === 'running'", timeout=60_000)
        assert len(studio.queue.listing()) == 1
        counter = "document.querySelector('#step-counter').textContent"
        page.wait_for_function(f"/^step [1-9][0-9]* of {steps}$/.test({counter})", timeout=900_000, polling=200)
        first_step = int(page.evaluate(counter).split()[1])
        page.wait_for_function(f"parseInt({counter}.split(' ')[1]) > {first_step}", timeout=900_000, polling=200)
        assert page.inner_text("#elapsed") != "-"
        points = "(charts['#chart-loss'] ? charts['#chart-loss'].plot.data[0].length : 0)"
        page.wait_for_function(f"{points} >= 1", timeout=900_000, polling=200)
        first = page.evaluate(points)
        shot("4-train-live")
        page.wait_for_function(f"{points} > {first}", timeout=900_000, polling=200)  # it updated live
        page.wait_for_function("document.querySelector('#live-status').textContent === 'complete'", timeout=900_000)
        name = studio.queue.listing()[0]["name"]
        shot("4-train-done")

        # 5. results: the prompting vs fine-tuned table, confusion matrix, filtered predictions, highest losses
        visit(f"/runs/{name}")
        page.wait_for_selector("#tables table")
        variants = page.eval_on_selector_all("#tables tr td:first-child", "cells => cells.map(c => c.textContent)")
        assert "fine-tuned" in variants and "zero_shot" in variants
        assert page.locator("#confusion tr").count() == 3  # header + negative + positive
        total = page.locator("#predictions tr").count() - 1
        assert total == 8 and page.inner_text("#prediction-count") == "8 of 8"
        page.check("#wrong-only")
        wrong = int(page.inner_text("#prediction-count").split()[0])
        assert page.locator("#predictions tr").count() - 1 == wrong
        assert all(t == "wrong" for t in page.eval_on_selector_all("#predictions td:last-child span",
                                                                    "s => s.map(x => x.textContent)"))
        page.uncheck("#wrong-only")
        page.select_option("#label-filter", "positive")
        assert page.inner_text("#prediction-count") == "4 of 8"
        assert page.locator("#losses tr").count() == 21  # header + the 20 highest-loss training examples
        shot("5-results")

        # 6. compare: a second run at another rate, then both side by side
        visit("/train")
        page.fill('[data-key="train.lr"]', "0.001")
        page.dispatch_event('[data-key="train.lr"]', "change")
        page.wait_for_function("document.querySelector('#yaml').textContent.includes('lr: 0.001')")
        page.select_option("#baselines", "none")
        page.wait_for_function("document.querySelector('#yaml').textContent.includes('baselines: []')")
        page.click("#start")
        page.wait_for_function(f"document.querySelector('#live-name').textContent !== {name!r}", timeout=60_000)
        page.wait_for_function("document.querySelector('#live-status').textContent === 'complete'", timeout=900_000)
        visit("/runs")
        page.wait_for_selector("#runs tr:nth-child(3)")
        page.check("#runs input >> nth=0")
        page.check("#runs input >> nth=1")
        page.click("#compare-selected")
        page.wait_for_selector("#diff tr:nth-child(2)")
        assert "train.lr" in page.inner_text("#diff")
        page.wait_for_selector("#curves .uplot")
        shot("6-compare")

        # 7. chat: a classifier is asked with the review alone (the run's template lays it out) and answers a
        # label; the fine-tuned model and its base answer the same input. Enter sends.
        visit(f"/chat?run={name}")
        assert "Type the text only" in page.inner_text("#chat-how")
        page.fill("#message", "a great movie with an award winning actor")
        page.press("#message", "Enter")
        page.wait_for_selector("#chat-fine_tuned .assistant:not(.pending)", timeout=120_000)
        page.wait_for_selector("#chat-base .assistant:not(.pending)")
        assert page.inner_text("#chat-fine_tuned .user") == "a great movie with an award winning actor"
        for side in ("fine_tuned", "base"):
            assert page.inner_text(f"#chat-{side} .assistant strong") in ("negative", "positive")
        assert page.inner_text("#busy").startswith("answered in ")
        shot("7-chat")

        # 8. export: GGUF, verified against the run
        visit(f"/export?run={name}")
        page.select_option("#format", "gguf")
        page.click("#export-button")
        page.wait_for_function("!['running', 'none'].includes(document.querySelector('#export-state').textContent)",
                               timeout=900_000)
        assert page.inner_text("#export-state") == "verified", page.inner_text("#checks")
        assert page.locator("#checks tr").count() >= 3
        assert page.inner_text("#export-folder").endswith(f"{name}/export/gguf-f16")
        links = page.eval_on_selector_all("#files a", "links => links.map(a => a.textContent)")
        gguf = next(text for text in links if text.endswith(".gguf"))
        with page.expect_download() as download:
            page.click(f"#files a:text-is('{gguf}')")
        saved = tmp_path / "downloaded.gguf"
        download.value.save_as(saved)
        exported = tmp_path / "runs" / name / "export" / "gguf-f16" / gguf
        assert saved.read_bytes() == exported.read_bytes()
        shot("8-export")
    studio.close()
    assert errors == []  # no script error on any page
