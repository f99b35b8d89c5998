"""The page's choices from the server's folders and files, in Chromium (see test_page.py): Model
(MODELS_DIR), VAE (VAE_DIR), Styles (STYLES_FILE), embeddings (EMBEDDINGS_DIR); and the fields
Clip skip and Variation seed / strength. Each control sends its field only when set, reaches the
job as the native API takes it (same image as POST /generate), comes back with "Reuse these
parameters" and the history, and is hidden when the server has nothing to offer.
"""

import base64
import json
import shutil
import time
import urllib.error

import pytest
from playwright.sync_api import expect

from pagekit import DESKTOP, PHONE, ROOT, Page, Server, fill_request, shown_png

FIXTURES = ROOT / "crates/pipeline/tests/fixtures"
# A1111's own styles file format, checked against A1111's modules/styles.py (styles unit tests).
STYLES_FILE = ROOT / "crates/server/tests/fixtures/styles/styles.csv"
DEFAULT = "tiny-a-vae8"  # the VAE_DIR VAE alt.safetensors fits it
OTHER = "tiny-b"
EXTRAS = ["Clip skip", "Variation seed", "Variation strength", "Resize seed from width", "Resize seed from height"]


def folders(root):
    """MODELS_DIR (a second model), VAE_DIR and EMBEDDINGS_DIR under `root`, as the server's env."""
    (root / "models").mkdir()
    shutil.copytree(FIXTURES / OTHER, root / "models" / OTHER)
    (root / "vaes").mkdir()
    shutil.copy(FIXTURES / "vae/alt.safetensors", root / "vaes")
    shutil.copytree(FIXTURES / "adapters/embeddings", root / "embeddings")
    # UPSCALERS_DIR: the tiny RRDBNet of tools/make_esrgan_fixtures.py under a model's name.
    (root / "upscalers").mkdir()
    shutil.copy(FIXTURES / "esrgan/x4-old.pth", root / "upscalers" / "4x-Tiny.pth")
    return {"MODELS_DIR": str(root / "models"), "VAE_DIR": str(root / "vaes"),
            "UPSCALERS_DIR": str(root / "upscalers"),
            "EMBEDDINGS_DIR": str(root / "embeddings"), "STYLES_FILE": str(STYLES_FILE),
            # Every request reaches the model: the native images compared are really made again.
            "RESPONSE_CACHE_MB": "0"}


@pytest.fixture(scope="module")
def stocked(tmp_path_factory):
    s = Server("--model", str(FIXTURES / DEFAULT), env=folders(tmp_path_factory.mktemp("stocked")))
    yield s
    s.stop()


def options(select):
    return select.evaluate("s => [...s.options].map(o => o.value)")


def posted_jobs(page):
    """The bodies the page POSTs to /jobs, and the ids the server answers, as they come."""
    sent, ids = [], []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/jobs") and sent.append(json.loads(r.post_data)))
    page.on("response", lambda r: r.request.method == "POST" and r.url.endswith("/jobs") and ids.append(r.json()["id"]))
    return sent, ids


def generated(page):
    image = page.get_by_role("img", name="Generated image", exact=True)
    expect(image).to_be_visible(timeout=60_000)
    return shown_png(image)


def native_png(server, body):
    return base64.b64decode(server.post_json("/generate", body)["image_base64"])


def test_vae_styles_embedding_clip_skip_and_variation_reach_the_job(browser, stocked):
    p = Page(browser, stocked, DESKTOP)
    page = p.page
    vae = page.get_by_role("combobox", name="VAE", exact=True)
    expect(vae).to_be_visible()
    assert options(vae) == ["", "alt.safetensors"]
    expect(vae).to_have_value("")  # the model's own unless chosen
    fill_request(page, "a boat", 2, 256, 3)
    # The embeddings are listed under the prompts; one goes in at the prompt's cursor.
    prompt = page.get_by_role("textbox", name="Prompt", exact=True)
    prompt.focus()
    page.keyboard.press("End")
    page.get_by_role("button", name="tinystyle").click()
    expect(prompt).to_have_value("a boat, tinystyle")
    # Styles: each row says what it adds; the request lists them in the order ticked.
    styles = {s["name"]: s for s in stocked.get_json("/styles")["styles"]}
    page.get_by_text("Styles", exact=True).click()
    cinematic = page.get_by_role("checkbox", name="Cinematic", exact=True)
    expect(cinematic).to_have_accessible_description(
        f"prompt: {styles['Cinematic']['prompt']} · negative prompt: {styles['Cinematic']['negative_prompt']}")
    page.get_by_role("checkbox", name="Appended", exact=True).check()
    cinematic.check()
    expect(page.locator("#styles-box summary")).to_have_text("Styles: Appended, Cinematic")
    vae.select_option("alt.safetensors")
    page.get_by_label("Clip skip").fill("2")
    page.get_by_text("Variation seed and seed resize", exact=True).click()
    page.get_by_label("Variation seed").fill("9")
    page.get_by_label("Variation strength").fill("0.3")
    page.get_by_label("Resize seed from width").fill("320")
    page.get_by_label("Resize seed from height").fill("192")
    sent, ids = posted_jobs(page)
    page.get_by_role("button", name="Generate").click()
    png = generated(page)
    request = {"prompt": "a boat, tinystyle", "negative_prompt": "", "steps": 2, "width": 256, "height": 256,
               "guidance_scale": 7.5, "seed": 3, "vae": "alt.safetensors", "styles": ["Appended", "Cinematic"],
               "clip_skip": 2, "variation_seed": 9, "variation_strength": 0.3,
               "seed_resize_from_width": 320, "seed_resize_from_height": 192}
    assert sent == [request]  # no `model`: the default model's
    # The job ran the styled prompts, in the order ticked (A1111's rules: a text with {prompt}
    # takes the prompt there, another is appended; the server's unit tests hold them to A1111's).
    job = stocked.get_json(f"/jobs/{ids[0]}")["request"]
    appended = f"a boat, tinystyle, {styles['Appended']['prompt']}"
    assert job["prompt"] == styles["Cinematic"]["prompt"].replace("{prompt}", appended)
    assert job["negative_prompt"] == f"{styles['Appended']['negative_prompt']}, {styles['Cinematic']['negative_prompt']}"
    fields = ["vae", "clip_skip", "variation_seed", "variation_strength", "seed_resize_from_width", "seed_resize_from_height"]
    assert {k: job[k] for k in fields + ["model"]} == {**{k: request[k] for k in fields}, "model": None}
    # The native API's image for the same JSON, and for the styles written out; each field counts.
    assert native_png(stocked, request) == png
    written_out = {k: v for k, v in request.items() if k != "styles"}
    assert native_png(stocked, {**written_out, "prompt": job["prompt"], "negative_prompt": job["negative_prompt"]}) == png
    for left_out in [["vae"], ["styles"], ["clip_skip"], ["variation_strength"], ["seed_resize_from_width", "seed_resize_from_height"]]:
        assert native_png(stocked, {k: v for k, v in request.items() if k not in left_out}) != png, left_out
    params = page.locator("#params")
    for shown in ["stylesAppended, Cinematic", "variation seed9", "variation strength0.3", "seed resize from width320",
                  "seed resize from height192", "clip skip2", "vaealt.safetensors"]:
        expect(params).to_contain_text(shown)
    # "Reuse these parameters" and the history bring back the prompt as written and the choices.
    for reuse in ["button", "history"]:
        prompt.fill("something else")
        page.get_by_role("checkbox", name="Appended", exact=True).uncheck()
        vae.select_option("")
        for label in EXTRAS:
            page.get_by_label(label).fill("")
        if reuse == "button":
            page.get_by_role("button", name="Reuse these parameters").click()
        else:
            page.reload()
            page.get_by_role("img", name="Earlier result").first.click()
        expect(prompt).to_have_value("a boat, tinystyle")
        expect(page.locator("#styles-box summary")).to_have_text("Styles: Appended, Cinematic")
        expect(vae).to_have_value("alt.safetensors")
        expect(page.get_by_label("Clip skip")).to_have_value("2")
        expect(page.get_by_label("Variation seed")).to_have_value("9")
        expect(page.get_by_label("Variation strength")).to_have_value("0.3")
        expect(page.get_by_label("Resize seed from width")).to_have_value("320")
        expect(page.get_by_label("Resize seed from height")).to_have_value("192")
    # Again: the same request (reuse names the scheduler and schedule that ran), the same image.
    sent.clear()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    assert sent == [{**request, "scheduler": job["scheduler"], "schedule": job["schedule"]}]
    assert generated(page) == png
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def test_model_select_runs_the_other_model(browser, stocked):
    p = Page(browser, stocked, DESKTOP)
    page = p.page
    model = page.get_by_role("combobox", name="Model", exact=True)
    expect(model).to_be_visible()
    # The default first, as the empty choice (requests without `model` run on it).
    assert options(model) == ["", OTHER]
    expect(model.locator("option").first).to_have_text(f"{DEFAULT} (default)")
    default_version = stocked.get_json("/health")["model_version"]
    expect(page.locator("#server")).to_contain_text(default_version)
    fill_request(page, "a red boat", 2, 256, 11)
    model.select_option(OTHER)
    sent, ids = posted_jobs(page)
    statuses = []
    page.expose_function("reportStatus", lambda text: statuses.append(text))
    page.evaluate("""() => new MutationObserver(() => window.reportStatus(document.getElementById('status').textContent))
                      .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true})""")
    # A job ahead on the default model: this one waits, so the page follows it before the
    # worker loads its model (a tiny model loads faster than the page subscribes otherwise).
    stocked.post_json("/jobs", {"prompt": "ahead", "steps": 20, "width": 256, "height": 256, "seed": 1})
    page.get_by_role("button", name="Generate").click()
    png = generated(page)
    # The worker held the default model: it loads this one first, and the page says so.
    assert "Queued, position 1." in statuses and f"Loading the model {OTHER}…" in statuses, statuses
    body = {"prompt": "a red boat", "negative_prompt": "", "steps": 2, "width": 256, "height": 256,
            "guidance_scale": 7.5, "seed": 11}
    assert sent == [{**body, "model": OTHER}]
    assert stocked.get_json(f"/jobs/{ids[0]}")["request"]["model"] == OTHER
    expect(page.locator("#params")).to_contain_text(f"model{OTHER}")
    # The header names the model the worker holds, which made this image, not the default.
    held = stocked.get_json("/health")["loaded_model"]
    assert held["name"] == OTHER and held["model_version"] != default_version, held
    expect(page.locator("#server")).to_contain_text(held["model_version"])
    expect(page.locator("#server")).not_to_contain_text(default_version)
    assert native_png(stocked, {**body, "model": OTHER}) == png
    assert native_png(stocked, body) != png
    model.select_option("")
    page.get_by_role("button", name="Reuse these parameters").click()
    expect(model).to_have_value(OTHER)
    assert p.console_errors == []
    p.close()


def test_each_choice_is_hidden_when_the_server_has_none(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    page.wait_for_load_state("networkidle")
    expect(page.get_by_role("combobox", name="Scheduler", exact=True)).to_be_visible()
    for name in ["Model", "VAE"]:
        expect(page.get_by_role("combobox", name=name, exact=True)).to_be_hidden()
    expect(page.locator("#styles-box")).to_be_hidden()
    expect(page.locator("#embeddings-row")).to_be_hidden()
    # Clip skip, the variation seed and the seed resize need nothing from the server; empty,
    # they are not sent.
    page.get_by_text("Variation seed and seed resize", exact=True).click()
    for label in EXTRAS:
        expect(page.get_by_label(label)).to_be_visible()
    fill_request(page, "a plain boat", 2, 256, 4)
    sent, _ = posted_jobs(page)
    page.get_by_role("button", name="Generate").click()
    generated(page)
    assert sent == [{"prompt": "a plain boat", "negative_prompt": "", "steps": 2, "width": 256, "height": 256,
                     "guidance_scale": 7.5, "seed": 4}]
    # The variation seed is text-to-image only: off with an init image, and not sent.
    page.get_by_label("Variation strength").fill("0.5")
    page.get_by_role("button", name="Use as init image").click()
    expect(page.get_by_label("Variation strength")).to_be_disabled()
    expect(page.get_by_label("Variation seed")).to_be_disabled()
    expect(page.get_by_text("No variation seed with an init image: it is text-to-image only.")).to_be_visible()
    sent.clear()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Done", timeout=60_000)
    assert len(sent) == 1 and "init_image" in sent[0] and "variation_strength" not in sent[0]
    expect(page.locator("#error")).to_be_hidden()
    page.get_by_role("button", name="Remove init image").click()
    expect(page.get_by_label("Variation strength")).to_be_enabled()
    assert p.console_errors == []
    p.close()


def test_a_refused_field_is_named_marked_and_focused(browser, tiny):
    p = Page(browser, tiny, DESKTOP)
    page = p.page
    fill_request(page, "a boat", 2, 256, 4)
    clip_skip = page.get_by_label("Clip skip")
    clip_skip.fill("9")  # past the field's max: the form does not stop it, the server does
    page.get_by_role("button", name="Generate").click()
    # The server's rule for the field, as it words it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        tiny.post_json("/generate", {"prompt": "a boat", "clip_skip": 9})
    rule = json.loads(refused.value.read())["fields"][0]
    assert rule["field"] == "clip_skip"
    expect(page.get_by_role("alert")).to_contain_text(f"clip_skip: {rule['rule']}")
    expect(clip_skip).to_have_attribute("aria-invalid", "true")
    expect(clip_skip).to_be_focused()
    clip_skip.fill("2")  # written again: no longer marked
    expect(clip_skip).not_to_have_attribute("aria-invalid", "true")
    # A field in a closed section: the section opens on it. (A seed resize takes both sides.)
    section = page.locator("#seed-extras")
    page.get_by_text("Variation seed and seed resize", exact=True).click()
    page.get_by_label("Resize seed from width").fill("320")
    page.get_by_text("Variation seed and seed resize", exact=True).click()
    expect(section).not_to_have_attribute("open", "")
    page.get_by_role("button", name="Generate").click()
    height = page.get_by_label("Resize seed from height")
    expect(height).to_have_attribute("aria-invalid", "true")
    expect(height).to_be_focused()
    expect(page.get_by_role("alert")).to_contain_text("seed_resize_from_height: ")
    p.close()


def test_a_styles_file_the_server_cannot_read_is_shown_with_the_reason(browser, tmp_path):
    # A folder where the file should be: GET /styles has no styles and says why.
    server = Server("--fake-generator", "step_ms=1", env={"STYLES_FILE": str(tmp_path)})
    try:
        listed = server.get_json("/styles")
        assert listed["styles"] == [] and listed["error"]
        p = Page(browser, server, DESKTOP)
        expect(p.page.locator("#styles-box")).to_be_visible()
        p.page.get_by_text("Styles", exact=True).click()
        expect(p.page.locator("#styles-error")).to_have_text(f"The styles file cannot be used: {listed['error']}")
        assert p.console_errors == []
        p.close()
    finally:
        server.stop()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_choices_are_named_and_fit(browser, stocked, viewport):
    p = Page(browser, stocked, viewport)
    page = p.page
    page.get_by_text("Styles", exact=True).click()
    expect(page.get_by_role("checkbox", name="Cinematic", exact=True)).to_be_visible()
    expect(page.get_by_role("combobox", name="Model", exact=True)).to_be_visible()
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
              .filter(e => e.offsetParent !== null)
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
              .map(e => e.id || e.outerHTML)"""
    )
    assert unnamed == []
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert p.console_errors == []
    p.close()


def test_a_key_protected_server_lists_its_choices_once_the_key_is_in(browser, tmp_path):
    key = "page-test-key-choices-0123"
    server = Server("--model", str(FIXTURES / DEFAULT), env={**folders(tmp_path), "API_KEYS": key})
    try:
        p = Page(browser, server, DESKTOP)
        page = p.page
        expect(page.get_by_label("API key")).to_be_visible()
        expect(page.locator("#styles-box")).to_be_hidden()
        page.get_by_label("API key").fill(key)
        page.get_by_label("API key").press("Tab")  # `change`: the page reads the lists again
        expect(page.get_by_role("combobox", name="VAE", exact=True)).to_be_visible()
        expect(page.get_by_role("combobox", name="Model", exact=True)).to_be_visible()
        expect(page.locator("#styles-box")).to_be_visible()
        expect(page.get_by_role("button", name="tinyneg")).to_be_visible()
        assert all(key not in u for u in p.requests)
        p.close()
    finally:
        server.stop()


def finished(server, job_id):
    """The job record once the job ended (succeeded, else the test fails)."""
    for _ in range(600):
        job = server.get_json(f"/jobs/{job_id}")
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "succeeded", job
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def test_a_styled_job_of_another_client_is_reused_from_the_jobs_list(browser, stocked):
    # A script sends a styled job (hires prompt of its own too); the page has never seen it.
    styles = ["Cinematic", "Appended"]
    body = {"prompt": "a quiet harbour", "negative_prompt": "fog", "steps": 2, "width": 256, "height": 256,
            "seed": 17, "guidance_scale": 6.0, "scheduler": "euler", "styles": styles,
            "hires": {"width": 320, "height": 320, "upscaler": "Lanczos", "steps": 2, "prompt": "a harbour, sharp"}}
    job = finished(stocked, stocked.post_json("/jobs", body)["id"])
    assert job["request"]["prompt"] != body["prompt"]  # it ran styled
    p = Page(browser, stocked, DESKTOP)
    page = p.page
    jobs = page.get_by_role("region", name="Jobs on the server")
    jobs.get_by_role("button", name="a quiet harbour", exact=True).click()
    # The prompts as written, the styles ticked: the next run styles them once.
    expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_have_value("a quiet harbour")
    expect(page.get_by_role("textbox", name="Negative prompt", exact=True)).to_have_value("fog")
    expect(page.locator("#styles-box summary")).to_have_text("Styles: Cinematic, Appended")
    expect(page.get_by_label("Hires prompt", exact=True)).to_have_value("a harbour, sharp")
    expect(page.get_by_role("checkbox", name="Enable hires fix")).to_be_checked()
    expect(page.get_by_label("Seed", exact=True)).to_have_value("17")
    sent, ids = posted_jobs(page)
    page.get_by_role("button", name="Generate").click()
    png = generated(page)
    assert sent[0]["prompt"] == "a quiet harbour" and sent[0]["styles"] == styles, sent
    again = stocked.get_json(f"/jobs/{ids[0]}")["request"]
    for k in ["prompt", "negative_prompt", "hires", "styles", "as_written", "seed", "steps", "scheduler"]:
        assert again[k] == job["request"][k], k
    # The same image as the script's job.
    assert png == base64.b64decode(job["result"]["image_base64"])
    # The record's styled prompts sent with the styles again (styled twice) make another image.
    twice = {**body, "prompt": job["request"]["prompt"], "negative_prompt": job["request"]["negative_prompt"]}
    assert native_png(stocked, twice) != png
    assert p.console_errors == []
    p.close()


def test_an_upscaler_model_of_the_server_runs_the_hires_fix(browser, stocked):
    """UPSCALERS_DIR's models join the hires fix's upscalers (A1111's list); the page's image is
    the native API's with `hires.upscaler` that model, and the parameters name it."""
    p = Page(browser, stocked, DESKTOP)
    page = p.page
    fill_request(page, "a hires lighthouse", 2, 256, 21)
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_role("checkbox", name="Enable hires fix").check()
    page.get_by_label("Hires width").fill("320")
    page.get_by_label("Hires height").fill("320")
    upscaler = page.get_by_role("combobox", name="Upscaler")
    expect(upscaler.locator("option", has_text="4x-Tiny")).to_have_count(1)
    assert options(upscaler)[-1] == "4x-Tiny", options(upscaler)
    upscaler.select_option("4x-Tiny")
    page.get_by_label("Hires strength").fill("0.5")
    page.get_by_label("Hires steps").fill("2")
    sent, _ = posted_jobs(page)
    page.get_by_role("button", name="Generate").click()
    png = generated(page)
    assert sent[-1]["hires"]["upscaler"] == "4x-Tiny", sent[-1]
    expect(page.locator("#params")).to_contain_text("320x320, 4x-Tiny, strength 0.5, 2 steps")
    hires = {"width": 320, "height": 320, "upscaler": "4x-Tiny", "strength": 0.5, "steps": 2}
    body = {"prompt": "a hires lighthouse", "steps": 2, "width": 256, "height": 256, "seed": 21,
            "negative_prompt": "", "guidance_scale": 7.5, "hires": hires}
    assert native_png(stocked, body) == png
    # Not the built-in upscaler's image: the model ran.
    assert native_png(stocked, {**body, "hires": {**hires, "upscaler": "Lanczos"}}) != png
    assert p.console_errors == []
    assert p.foreign_requests() == []
    p.close()


def aliased(lora, alias):
    """A LoRA file's bytes with `ss_output_name` (A1111's alias) in its safetensors metadata."""
    data = lora.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = {"ss_output_name": alias}
    packed = json.dumps(header).encode()
    return len(packed).to_bytes(8, "little") + packed + data[8 + n:]


def test_jobs_of_other_clients_come_back_with_their_loras_once_and_their_hires_scale(browser, tmp_path):
    """A styled job whose prompt names a LoRA by its alias, beside one listed in `loras`, ticks
    only the listed one (the prompt's tag brings the other); a hires pass asked by scale (native
    `hires.scale`, A1111's `hr_scale`) comes back by scale. Run again: the job's image."""
    loras = FIXTURES / "adapters/loras"
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras/ink_kohya.safetensors").write_bytes(aliased(loras / "ink_kohya.safetensors", "Ink Style"))
    shutil.copy(loras / "soft_peft.safetensors", tmp_path / "loras")
    server = Server("--model", str(FIXTURES / DEFAULT), env={
        "LORA_DIR": str(tmp_path / "loras"), "STYLES_FILE": str(STYLES_FILE), "RESPONSE_CACHE_MB": "0"})
    try:
        body = {"prompt": "a red house <lora:Ink Style:0.5>", "steps": 2, "width": 256, "height": 256,
                "seed": 5, "scheduler": "euler", "styles": ["Appended"],
                "loras": [{"name": "soft_peft", "weight": 0.75}],
                "hires": {"scale": 1.25, "upscaler": "Lanczos", "steps": 2}}
        job = finished(server, server.post_json("/jobs", body)["id"])
        assert [l["name"] for l in job["request"]["loras"]] == ["soft_peft", "ink_kohya"], job["request"]
        a1111 = {"prompt": "a blue boat", "steps": 2, "width": 256, "height": 256, "seed": 6,
                 "sampler_name": "Euler", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos",
                 "hr_second_pass_steps": 2, "denoising_strength": 0.5}
        server.post_json("/sdapi/v1/txt2img", a1111)
        p = Page(browser, server, DESKTOP)
        page = p.page
        jobs = page.get_by_role("region", name="Jobs on the server")
        ink = page.get_by_role("checkbox", name="ink_kohya")
        soft = page.get_by_role("checkbox", name="soft_peft")
        by_scale = page.get_by_role("radio", name="By scale")
        jobs.get_by_role("button", name="a blue boat", exact=True).click()
        expect(by_scale).to_be_checked()
        expect(page.get_by_label("Hires scale")).to_have_value("1.5")
        jobs.get_by_role("button", name=body["prompt"], exact=True).click()
        expect(page.get_by_role("textbox", name="Prompt", exact=True)).to_have_value(body["prompt"])
        page.locator("#lora-box summary").click()
        expect(soft).to_be_checked()
        expect(page.get_by_label("Weight of soft_peft")).to_have_value("0.75")
        expect(ink).not_to_be_checked()
        expect(by_scale).to_be_checked()
        expect(page.get_by_label("Hires scale")).to_have_value("1.25")
        sent, _ = posted_jobs(page)
        page.get_by_role("button", name="Generate").click()
        png = generated(page)
        assert sent[0]["loras"] == body["loras"] and sent[0]["hires"]["scale"] == 1.25, sent
        assert "width" not in sent[0]["hires"], sent
        assert png == base64.b64decode(job["result"]["image_base64"])
        assert p.console_errors == []
        p.close()
    finally:
        server.stop()
