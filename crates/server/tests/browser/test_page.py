"""The web page at `/` in a real headless Chromium (Debian's), driven by Playwright.

Run by `.ci/run` through `tools/browser_tests.sh` after `cargo test` has built `target/debug/sdserve`.
Each test starts its own `sdserve serve` on a free port: the tiny model for real images, the fake
generator (slow steps) where a run must last long enough to be cancelled.
Environment: SDSERVE_BIN (the binary), CHROMIUM (default /usr/bin/chromium), SCREENSHOTS (a folder
to write the README's screenshots into; optional).
"""

import base64
import json
import re

import pytest
from playwright.sync_api import expect

from pagekit import DESKTOP, PHONE, ROOT, TINY, Page, Server, fill_request, shot


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_controls_are_named_and_the_page_fits(browser, tiny, viewport):
    p = Page(browser, tiny, viewport)
    page = p.page
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_be_visible()
    # Exact names: "Hires negative prompt", "Hires scheduler" are other fields.
    expect(page.get_by_role("textbox", name="Negative prompt", exact=True)).to_be_visible()
    for name in ["Steps", "Width", "Height", "Seed", "Guidance scale"]:
        expect(page.get_by_label(name, exact=True)).to_be_visible()
    expect(page.get_by_role("combobox", name="Scheduler", exact=True)).to_be_visible()
    expect(page.get_by_role("combobox", name="Schedule type", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
    expect(page.get_by_role("progressbar")).to_be_visible()
    # Every form control has an accessible name.
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
              .filter(e => e.offsetParent !== null)
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
              .map(e => e.id || e.outerHTML)"""
    )
    assert unnamed == []
    # Readable without sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.wait_for_load_state("networkidle")
    assert p.console_errors == []
    assert p.foreign_requests() == []
    if viewport is DESKTOP:
        shot(page, "page-idle")
    p.close()


def test_generate_shows_progress_then_the_image_of_generate(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a lighthouse at dawn", 6, 256, 1234)
    steps_seen = []
    page.expose_function("reportStep", lambda v: steps_seen.append(v))
    page.evaluate(
        """() => new MutationObserver(() => window.reportStep(Number(document.getElementById('progress').value)))
              .observe(document.getElementById('progress'), {attributes: true})"""
    )
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    # Progress rose step by step to the total (UNet evaluations, as the job reports them).
    bar = page.get_by_role("progressbar")
    assert bar.evaluate("b => b.value === b.max && b.max >= 6")
    assert len(steps_seen) >= 2 and max(steps_seen) == bar.evaluate("b => b.max")
    shown = image.get_attribute("src")
    assert shown.startswith("data:image/png;base64,")
    png = base64.b64decode(shown.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 256]
    # The same image as the native API for the same parameters.
    native = tiny.post_json("/generate", {"prompt": "a lighthouse at dawn", "steps": 6, "width": 256, "height": 256, "seed": 1234, "negative_prompt": "", "guidance_scale": 7.5})
    assert base64.b64decode(native["image_base64"]) == png
    expect(page.get_by_text("1234").first).to_be_visible()  # the seed is shown with the parameters
    expect(page.get_by_role("link", name="Download")).to_have_attribute("href", shown)
    shot(page, "page-done")
    # The history keeps it, across a reload (this browser's storage).
    page.reload()
    expect(page.get_by_role("img", name="Earlier result").first).to_be_visible()
    # "Reuse these parameters" from the history fills the form.
    page.get_by_label("Seed", exact=True).fill("")
    page.get_by_role("img", name="Earlier result").first.click()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("1234")
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def test_cancel_stops_a_long_run(browser, slow):
    p = Page(browser, slow, DESKTOP)
    page = p.page
    fill_request(page, "a slow one", 30, 256, 5)
    job_ids = []
    page.on("response", lambda r: r.request.method == "POST" and r.url.endswith("/jobs") and job_ids.append(r.json()["id"]))
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile(r"Step \d+ of 30"))).to_be_visible(timeout=20_000)
    expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
    shot(page, "page-running")
    page.get_by_role("button", name="Cancel").click()
    expect(page.get_by_text("Cancelled.")).to_be_visible(timeout=10_000)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert len(job_ids) == 1
    job = slow.get_json(f"/jobs/{job_ids[0]}")
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] < 30
    assert p.console_errors == []
    p.close()


def test_keyboard_alone_runs_a_generation(browser, tiny):
    p = Page(browser, tiny, PHONE)
    page = p.page
    page.get_by_role("textbox", name="Prompt", exact=True).focus()
    page.keyboard.type("keyboard only")
    for label, value in [("Steps", "3"), ("Width", "256"), ("Height", "256")]:
        page.get_by_label(label, exact=True).fill(value)
    # Tab from the prompt to the Generate button, then press Enter.
    page.get_by_role("textbox", name="Prompt", exact=True).focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    assert page.evaluate("document.activeElement.id") == "generate"
    page.keyboard.press("Enter")
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    # Ctrl+Enter in a prompt box generates too (in the negative prompt as in the prompt).
    first = image.get_attribute("src")
    negative = page.get_by_role("textbox", name="Negative prompt", exact=True)
    negative.focus()
    page.keyboard.type("fog")
    page.keyboard.press("Control+Enter")
    expect(image).not_to_have_attribute("src", first, timeout=60_000)
    expect(page.locator("#params")).to_contain_text("fog")
    assert p.console_errors == []
    p.close()


def test_a_key_protected_server_asks_for_the_key_and_keeps_it_out_of_urls(browser):
    key = "page-test-key-0123456789"
    server = Server("--model", str(TINY), env={"API_KEYS": key})
    try:
        p = Page(browser, server, DESKTOP)
        page = p.page
        key_field = page.get_by_label("API key")
        expect(key_field).to_be_visible()
        fill_request(page, "with a key", 3, 256, 3)
        key_field.fill(key)
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image", exact=True)).to_be_visible(timeout=60_000)
        assert all(key not in u for u in p.requests)
        assert p.foreign_requests() == []
        # Console errors from the first, refused probe (401) are the browser's own network log lines.
        assert [e for e in p.console_errors if "401" not in e] == []
        p.close()
    finally:
        server.stop()


def test_lora_files_dropped_in_show_up_without_a_reload(browser, tmp_path):
    loras = ROOT / "crates/pipeline/tests/fixtures/adapters/loras"
    (tmp_path / "ink_kohya.safetensors").write_bytes((loras / "ink_kohya.safetensors").read_bytes())
    server = Server("--model", str(ROOT / "crates/pipeline/tests/fixtures/tiny-a-vae8"), env={"LORA_DIR": str(tmp_path)})
    try:
        p = Page(browser, server, DESKTOP)
        page = p.page
        summary = page.locator("#lora-box summary")
        summary.click()
        ink = page.get_by_role("checkbox", name="ink_kohya")
        ink.check()
        page.get_by_label("Weight of ink_kohya").fill("0.5")
        # Files dropped into LORA_DIR while the page is open: one that fits, one half-copied.
        soft = (loras / "soft_peft.safetensors").read_bytes()
        (tmp_path / "soft_peft.safetensors").write_bytes(soft)
        (tmp_path / "broken.safetensors").write_bytes(soft[: len(soft) // 2])
        # Closing and opening the list again reads it again (so does the window regaining focus).
        summary.click()
        summary.click()
        expect(page.get_by_role("checkbox", name="soft_peft")).to_be_enabled()
        broken = page.get_by_role("checkbox", name="broken")
        expect(broken).to_be_disabled()
        expect(page.locator(".lora[data-name=broken] .lora-error")).to_contain_text("truncated")
        # The row that stayed kept its tick and weight.
        expect(ink).to_be_checked()
        expect(page.get_by_label("Weight of ink_kohya")).to_have_value("0.5")
        # "Reuse these parameters" ticks the LoRAs the run had, with their weights, and no other.
        fill_request(page, "an ink boat", 2, 256, 8)
        sent = []
        page.on("request", lambda r: r.method == "POST" and r.url.endswith("/jobs") and sent.append(json.loads(r.post_data)))
        page.get_by_role("button", name="Generate").click()
        expect(page.get_by_role("img", name="Generated image", exact=True)).to_be_visible(timeout=60_000)
        assert sent[0]["loras"] == [{"name": "ink_kohya", "weight": 0.5}]
        ink.uncheck()
        page.get_by_label("Weight of ink_kohya").fill("1")
        page.get_by_role("checkbox", name="soft_peft").check()
        page.get_by_role("button", name="Reuse these parameters").click()
        expect(ink).to_be_checked()
        expect(page.get_by_label("Weight of ink_kohya")).to_have_value("0.5")
        expect(page.get_by_role("checkbox", name="soft_peft")).not_to_be_checked()
        assert p.console_errors == []
        p.close()
    finally:
        server.stop()


def test_hires_fix_gives_an_image_of_the_hires_size(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a hires lighthouse", 2, 256, 21)
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_role("checkbox", name="Enable hires fix").check()
    page.get_by_label("Hires width").fill("384")
    page.get_by_label("Hires height").fill("320")
    # The upscalers are the server's (A1111's latent modes and image upscalers).
    upscaler = page.get_by_role("combobox", name="Upscaler")
    expect(upscaler.locator("option", has_text="Latent (bicubic antialiased)")).to_have_count(1)
    upscaler.select_option("Lanczos")
    page.get_by_label("Hires strength").fill("0.5")
    page.get_by_label("Hires steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [384, 320]
    expect(page.locator("#params")).to_contain_text("384x320, Lanczos, strength 0.5, 2 steps")
    # The native API's image for the same request.
    hires = {"width": 384, "height": 320, "upscaler": "Lanczos", "strength": 0.5, "steps": 2}
    native = tiny.post_json("/generate", {"prompt": "a hires lighthouse", "steps": 2, "width": 256, "height": 256, "seed": 21, "negative_prompt": "", "guidance_scale": 7.5, "hires": hires})
    assert native["metadata"]["hires"]["width"] == 384
    png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    assert base64.b64decode(native["image_base64"]) == png
    # "Reuse these parameters" brings the hires pass back.
    page.get_by_role("checkbox", name="Enable hires fix").uncheck()
    page.get_by_label("Hires width").fill("512")
    upscaler.select_option("Latent")
    page.get_by_role("button", name="Reuse these parameters").click()
    expect(page.get_by_role("checkbox", name="Enable hires fix")).to_be_checked()
    expect(page.get_by_label("Hires width")).to_have_value("384")
    expect(upscaler).to_have_value("Lanczos")
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def test_tiling_checkbox_asks_for_a_seamless_image(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a stone wall texture", 2, 256, 77)
    tiling = page.get_by_role("checkbox", name="Tiling", exact=True)
    expect(tiling).not_to_be_checked()
    tiling.check()
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    expect(page.locator("#params")).to_contain_text("tiling")
    # The native API's tiling image, not the plain one.
    body = {"prompt": "a stone wall texture", "steps": 2, "width": 256, "height": 256, "seed": 77, "negative_prompt": "", "guidance_scale": 7.5}
    tiled = tiny.post_json("/generate", {**body, "tiling": True})
    plain = tiny.post_json("/generate", body)
    png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    assert base64.b64decode(tiled["image_base64"]) == png
    assert base64.b64decode(plain["image_base64"]) != png
    # "Reuse these parameters" brings it back.
    tiling.uncheck()
    page.get_by_role("button", name="Reuse these parameters").click()
    expect(tiling).to_be_checked()
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def test_schedule_type_asks_for_those_sigmas(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    # The schedule types are the server's (SigmaScheduleName but `default`, the first option).
    names = tiny.get_json("/openapi.json")["components"]["schemas"]["SigmaScheduleName"]["enum"]
    schedule = page.get_by_role("combobox", name="Schedule type", exact=True)
    expect(schedule).to_have_value("")
    want = [""] + [n for n in names if n != "default"]
    expect(schedule.locator("option")).to_have_count(len(want))  # once the page has read the lists
    assert schedule.evaluate("s => [...s.options].map(o => o.value)") == want
    fill_request(page, "a lighthouse at dusk", 2, 256, 31)
    page.get_by_role("combobox", name="Scheduler", exact=True).select_option("euler")
    schedule.select_option("exponential")
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    expect(page.locator("#params")).to_contain_text("exponential")
    # The native API's image on those sigmas, not the scheduler's own.
    body = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 256, "height": 256, "seed": 31,
            "negative_prompt": "", "guidance_scale": 7.5, "scheduler": "euler"}
    exp = tiny.post_json("/generate", {**body, "schedule": "exponential"})
    own = tiny.post_json("/generate", body)
    png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    assert base64.b64decode(exp["image_base64"]) == png
    assert base64.b64decode(own["image_base64"]) != png
    # "Reuse these parameters" brings it back.
    schedule.select_option("")
    page.get_by_role("button", name="Reuse these parameters").click()
    expect(schedule).to_have_value("exponential")
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def test_hires_fix_is_off_while_an_init_image_is_set(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a hires lighthouse", 2, 256, 21)
    page.get_by_text("Hires fix", exact=True).click()
    enable = page.get_by_role("checkbox", name="Enable hires fix")
    enable.check()
    page.get_by_label("Hires width").fill("384")
    page.get_by_label("Hires height").fill("384")
    note = page.get_by_text("Off while an init image is set")
    expect(note).to_be_hidden()
    # An init image (text-to-image only: the server would answer hires with a 422).
    init = base64.b64decode(tiny.post_json("/generate", {"prompt": "a boat", "steps": 2, "width": 256, "height": 256, "seed": 5})["image_base64"])
    page.get_by_text("Init image and mask", exact=True).click()
    page.locator("#init").set_input_files({"name": "init.png", "mimeType": "image/png", "buffer": init})
    expect(enable).to_be_disabled()
    expect(page.get_by_label("Hires width")).to_be_disabled()
    expect(page.get_by_role("combobox", name="Upscaler")).to_be_disabled()
    expect(note).to_be_visible()
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 256]
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#params")).not_to_contain_text("384x384")
    # Without the init image the section is back as it was.
    page.get_by_role("button", name="Remove init image").click()
    expect(enable).to_be_enabled()
    expect(enable).to_be_checked()
    expect(note).to_be_hidden()
    assert p.console_errors == []
    p.close()


def test_hires_fix_by_scale_with_its_own_scheduler_and_prompts(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a hires lighthouse", 2, 256, 21)
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_role("checkbox", name="Enable hires fix").check()
    # A scale or a width and height, never both: only the chosen way's fields are on.
    scale = page.get_by_label("Hires scale")
    expect(scale).to_be_disabled()
    page.get_by_role("radio", name="By scale").check()
    expect(scale).to_be_enabled()
    expect(page.get_by_label("Hires width")).to_be_disabled()
    expect(page.get_by_label("Hires height")).to_be_disabled()
    # The size a scale gives is shown (and why the server would refuse one that does not fit).
    scale.fill("1.3")
    expect(page.locator("#hires-target")).to_contain_text("256x256 times 1.3 is 332.8x332.8: each side must come out a multiple of 64")
    scale.fill("1.5")
    expect(page.locator("#hires-target")).to_contain_text("the image will be 384x384")
    expect(page.get_by_label("Hires width")).to_have_value("384")
    # The second pass's schedulers are the server's (the API's SchedulerName), after "as the first pass".
    names = tiny.get_json("/openapi.json")["components"]["schemas"]["SchedulerName"]["enum"]
    scheduler = page.get_by_role("combobox", name="Hires scheduler")
    expect(scheduler.locator("option")).to_have_count(len(names) + 1)  # once the page has read the lists
    assert scheduler.evaluate("s => [...s.options].map(o => o.value)") == [""] + names
    scheduler.select_option("dpmpp_2m")
    page.get_by_role("textbox", name="Hires prompt", exact=True).fill("a hires lighthouse, (sharp:1.2)")
    page.get_by_role("textbox", name="Hires negative prompt", exact=True).fill("fog")
    page.get_by_label("Hires strength").fill("0.5")
    page.get_by_label("Hires steps").fill("2")
    sent = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/jobs") and sent.append(json.loads(r.post_data)))
    page.get_by_role("button", name="Generate").click()
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    assert image.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [384, 384]
    hires = {"scale": 1.5, "upscaler": "Latent", "strength": 0.5, "steps": 2, "scheduler": "dpmpp_2m",
             "prompt": "a hires lighthouse, (sharp:1.2)", "negative_prompt": "fog"}
    request = {"prompt": "a hires lighthouse", "negative_prompt": "", "steps": 2, "width": 256, "height": 256,
               "guidance_scale": 7.5, "seed": 21, "hires": hires}
    assert sent == [request]
    expect(page.locator("#params")).to_contain_text('384x384, Latent, strength 0.5, 2 steps, dpmpp_2m, prompt "a hires lighthouse, (sharp:1.2)", negative prompt "fog"')
    # The first pass's size (width, height) and the image's, named apart.
    expect(page.locator("#params")).to_contain_text("width256height256image width384image height384")
    # The same PNG as /generate with the same JSON.
    native = tiny.post_json("/generate", request)
    png = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    assert base64.b64decode(native["image_base64"]) == png
    # "Reuse these parameters" (and the history, after a reload) bring back the pass as asked: by scale.
    for reuse in ["button", "history"]:
        page.get_by_role("radio", name="By scale").check()
        scale.fill("2")
        page.get_by_role("radio", name="By width and height").check()
        scheduler.select_option("")
        page.get_by_role("textbox", name="Hires prompt", exact=True).fill("")
        page.get_by_role("textbox", name="Hires negative prompt", exact=True).fill("")
        page.get_by_role("checkbox", name="Enable hires fix").uncheck()
        if reuse == "button":
            page.get_by_role("button", name="Reuse these parameters").click()
        else:
            page.get_by_role("img", name="Earlier result").first.click()
        expect(page.get_by_role("checkbox", name="Enable hires fix")).to_be_checked()
        expect(page.get_by_role("radio", name="By scale")).to_be_checked()
        expect(scale).to_have_value("1.5")
        expect(scale).to_be_enabled()
        expect(page.get_by_label("Hires width")).to_be_disabled()
        expect(scheduler).to_have_value("dpmpp_2m")
        expect(page.get_by_role("textbox", name="Hires prompt", exact=True)).to_have_value("a hires lighthouse, (sharp:1.2)")
        expect(page.get_by_role("textbox", name="Hires negative prompt", exact=True)).to_have_value("fog")
        if reuse == "button":
            page.reload()
            page.get_by_text("Hires fix", exact=True).click()
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()
