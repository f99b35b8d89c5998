"""Drives a running `sdserve serve` through the REAL client packages, `webuiapi` (AUTOMATIC1111's
/sdapi/v1) and `openai` (/v1), unmodified, on the tiny test model.

Every image that comes through a dialect must hold exactly the pixels that the native
`POST /generate` gives for the same parameters (PNG decoded, pixels compared).

Run by tests/clients/run.sh (which makes the virtual environment); by hand:
    SDSERVE_BIN=target/debug/sdserve python tests/clients/test_clients.py
"""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import struct

import openai
import requests
import webuiapi
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("SDSERVE_BIN", os.path.join(ROOT, "target", "debug", "sdserve"))
MODEL = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "tiny-b")
ADAPTERS = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "adapters")
# A second model in MODELS_DIR, fast at 256x256 as tiny-b.
OTHER = "tiny-a-vae8"
# A1111's styles.csv format (the server's styles unit tests hold it to A1111's modules/styles.py).
STYLES = os.path.join(ROOT, "crates", "server", "tests", "fixtures", "styles", "styles.csv")

PROMPT = "a watercolor lighthouse at dawn"
NEGATIVE = "blurry"
SIZE = 256


ESRGAN = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "esrgan")


class Server:
    """`sdserve serve` on a free port (PORT=0; the address comes from the JSON start-up log)."""

    def __init__(self):
        self.cache = tempfile.mkdtemp(prefix="sdserve-clients-")
        # Empty at start; a test drops files in while the server runs.
        self.loras = os.path.join(self.cache, "loras")
        self.embeddings = os.path.join(self.cache, "embeddings")
        os.makedirs(self.loras)
        os.makedirs(self.embeddings)
        self.vaes = os.path.join(self.cache, "vaes")
        os.makedirs(self.vaes)
        # A tiny ESRGAN (tools/make_esrgan_fixtures.py) as A1111's models/ESRGAN holds one.
        self.upscalers = os.path.join(self.cache, "esrgan")
        os.makedirs(self.upscalers)
        shutil.copy(os.path.join(ESRGAN, "x4-old.pth"), os.path.join(self.upscalers, "4x-Tiny.pth"))
        self.models = os.path.join(self.cache, "models")
        shutil.copytree(os.path.join(os.path.dirname(MODEL), OTHER), os.path.join(self.models, OTHER))
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOST": "127.0.0.1",
            "PORT": "0",
            "MODEL_ID": MODEL,
            "MODEL_CACHE_DIR": self.cache,
            "LOG_FORMAT": "json",
            "GENERATION_TIMEOUT_SECONDS": "600",
            # Every dialect request must reach the model, so that images are really compared.
            "RESPONSE_CACHE_MB": "0",
            # img2img, edits and png-info carry images in the body.
            "MAX_BODY_BYTES": str(16 << 20),
            "LORA_DIR": self.loras,
            "EMBEDDINGS_DIR": self.embeddings,
            "MODELS_DIR": self.models,
            "VAE_DIR": self.vaes,
            "UPSCALERS_DIR": self.upscalers,
            "STYLES_FILE": STYLES,
        }
        self.proc = subprocess.Popen(
            [BIN, "serve"], env=env, stdout=subprocess.PIPE, text=True
        )
        self.addr = None
        deadline = time.time() + 60
        for line in self.proc.stdout:
            if '"listening' in line:
                self.addr = json.loads(line)["addr"]
                break
            if time.time() > deadline:
                break
        if self.addr is None:
            self.proc.kill()
            raise RuntimeError("sdserve did not start")
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        self.url = f"http://{self.addr}"
        deadline = time.time() + 120
        while requests.get(self.url + "/health").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("model not ready: " + requests.get(self.url + "/health").text)
            time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.cache, ignore_errors=True)


SERVER = None


def setUpModule():
    global SERVER
    SERVER = Server()


def tearDownModule():
    SERVER.stop()


class Timed(unittest.TestCase):
    """Prints each test's wall time (the stage must stay fast)."""

    def setUp(self):
        self._t0 = time.time()

    def tearDown(self):
        print(f"  [{time.time() - self._t0:.1f} s]", file=sys.stderr, end=" ")


def native(**fields):
    """The native `/generate` answer for the same parameters: the list of PIL images."""
    r = requests.post(SERVER.url + "/generate", json=fields)
    assert r.status_code == 200, r.text
    body = r.json()
    images = body.get("images") or [body["image_base64"]]
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in images], body["metadata"]


def pixels(img):
    assert img.mode == "RGB", img.mode
    return img.tobytes()


def native_fields():
    doc = requests.get(SERVER.url + "/openapi.json").json()
    return set(doc["components"]["schemas"]["GenerateRequest"]["properties"])


def b64_png(img):
    out = io.BytesIO()
    img.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


class A1111(Timed):
    def setUp(self):
        super().setUp()
        host, port = SERVER.addr.rsplit(":", 1)
        # Exactly how a script builds the client; its defaults: sampler "Euler a",
        # scheduler "automatic", 20 steps.
        self.api = webuiapi.WebUIApi(host=host, port=int(port))

    def test_idle_progress_and_lists(self):
        p = self.api.get_progress()
        self.assertEqual(p["progress"], 0)
        self.assertEqual(p["state"]["job_count"], 0)
        self.api.util_wait_for_ready(check_interval=0.1)  # returns at once when idle
        names = self.api.util_get_sampler_names()
        self.assertEqual(
            names,
            sorted(["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DDIM", "PLMS", "LMS",
                    "UniPC", "Heun", "DPM2", "DPM2 a", "LCM"]),
        )
        labels = [s["label"] for s in self.api.get_schedulers()]
        self.assertEqual(labels, ["Automatic", "Uniform", "Karras", "Exponential", "Beta"])
        models = self.api.util_get_model_names()
        self.assertEqual(len(models), 2)
        models = [m for m in models if m.startswith("tiny-b")]
        self.assertEqual(len(models), 1, models)
        self.api.util_set_model(models[0])
        self.assertEqual(self.api.util_get_current_model(), models[0])
        self.assertEqual(self.api.set_options({"CLIP_stop_at_last_layers": 1}), {})
        self.assertEqual(self.api.get_options()["CLIP_stop_at_last_layers"], 1)
        self.assertIsInstance(self.api.get_loras(), list)
        self.assertEqual(self.api.get_scripts(), {"txt2img": [], "img2img": []})
        self.assertEqual(self.api.skip(), {})

    def test_util_set_model_switches_the_checkpoint_of_later_requests(self):
        models = self.api.get_sd_models()
        self.assertEqual([m["model_name"] for m in models], ["tiny-b", OTHER])
        default = models[0]["title"]
        fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=2, cfg_scale=5,
                      width=SIZE, height=SIZE, sampler_name="Euler")
        try:
            # By a loose name, as scripts call it: the client picks the closest title.
            self.api.util_set_model("tiny-a-vae")
            self.assertEqual(self.api.util_get_current_model(), models[1]["title"])
            other = self.api.txt2img(**fields).image
            (want,), meta = native(
                prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=2, guidance_scale=5,
                width=SIZE, height=SIZE, scheduler="euler", model=OTHER,
            )
            self.assertTrue(meta["model_version"].startswith(OTHER), meta)
            self.assertEqual(pixels(other), pixels(want))
        finally:
            self.api.util_set_model(default)
        self.assertEqual(self.api.util_get_current_model(), default)
        (want,), _ = native(
            prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=2, guidance_scale=5,
            width=SIZE, height=SIZE, scheduler="euler",
        )
        self.assertEqual(pixels(self.api.txt2img(**fields).image), pixels(want))
        self.assertNotEqual(pixels(other), pixels(want))

    def test_sd_vae_by_override_settings_and_options_equals_native_vae(self):
        # Dropped in while the server runs; fits tiny-a-vae8 (the MODELS_DIR model).
        vae = "alt.safetensors"
        shutil.copy(os.path.join(os.path.dirname(MODEL), "vae", vae), SERVER.vaes)
        self.assertEqual(self.api.get_sd_vae(), [{"model_name": vae, "filename": vae}])
        fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=2, cfg_scale=5,
                      width=SIZE, height=SIZE, sampler_name="Euler")
        same = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, steps=2, guidance_scale=5,
                    width=SIZE, height=SIZE, scheduler="euler", model=OTHER)
        (want,), meta = native(vae=vae, **same)
        self.assertEqual(meta["vae"], vae)
        (own,), meta = native(**same)
        self.assertIsNone(meta["vae"])
        self.assertNotEqual(pixels(want), pixels(own))
        r = self.api.txt2img(**fields, override_settings={"sd_model_checkpoint": OTHER,
                                                          "sd_vae": vae})
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertEqual(r.info["sd_vae_name"], vae)
        self.assertRegex(r.info["infotexts"][0], r"VAE hash: [0-9a-f]{10}, VAE: alt\.safetensors")
        self.assertEqual(self.api.get_options()["sd_vae"], "Automatic")
        try:
            self.api.set_options({"sd_vae": vae})
            self.assertEqual(self.api.get_options()["sd_vae"], vae)
            r = self.api.txt2img(**fields, override_settings={"sd_model_checkpoint": OTHER})
            self.assertEqual(pixels(r.image), pixels(want))
        finally:
            self.api.set_options({"sd_vae": "Automatic"})
        r = self.api.txt2img(**fields, override_settings={"sd_model_checkpoint": OTHER})
        self.assertEqual(pixels(r.image), pixels(own))
        self.assertIsNone(r.info["sd_vae_name"])

    def test_loras_and_embeddings_dropped_in_are_listed(self):
        self.assertEqual(self.api.get_loras(), [])
        self.assertEqual(self.api.get_embeddings(), {"loaded": {}, "skipped": {}})
        lora = os.path.join(SERVER.loras, "ink_kohya.safetensors")
        shutil.copy(os.path.join(ADAPTERS, "loras", "ink_kohya.safetensors"), lora)
        # tinystyle's vectors are 32 wide (tiny-a's text encoder): not tiny-b's 48, so skipped.
        shutil.copy(os.path.join(ADAPTERS, "embeddings", "tinystyle.pt"), SERVER.embeddings)
        # One vector of tiny-b's width, written as a textual-inversion .safetensors.
        header = json.dumps(
            {"emb_params": {"dtype": "F32", "shape": [1, 48], "data_offsets": [0, 192]}}
        ).encode()
        with open(os.path.join(SERVER.embeddings, "wide48.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + struct.pack("<48f", *[0.01] * 48))
        # Picked up without a refresh call (the idle worker looks every second).
        deadline = time.time() + 30
        while not self.api.get_loras() and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(
            self.api.get_loras(),
            [
                {
                    "name": "ink_kohya",
                    "alias": "ink_kohya",
                    "path": lora,
                    "metadata": {
                        "ss_network_module": "lycoris.kohya",
                        "generated_by": "tools/make_adapter_fixtures.py",
                    },
                }
            ],
        )
        self.assertEqual(
            self.api.get_embeddings(),
            {
                "loaded": {
                    "wide48": {"step": None, "sd_checkpoint": None,
                               "sd_checkpoint_name": None, "shape": 48, "vectors": 1}
                },
                "skipped": {
                    "tinystyle": {"step": 100, "sd_checkpoint": None,
                                  "sd_checkpoint_name": None, "shape": 32, "vectors": 2}
                },
            },
        )
        # Removed, then A1111's refresh routes (webuiapi has no method for them).
        os.remove(lora)
        for name in os.listdir(SERVER.embeddings):
            os.remove(os.path.join(SERVER.embeddings, name))
        for route in ["refresh-loras", "refresh-embeddings"]:
            r = self.api.session.post(f"{self.api.baseurl}/{route}")
            self.assertEqual((r.status_code, r.json()), (200, None))
        self.assertEqual(self.api.get_loras(), [])
        self.assertEqual(self.api.get_embeddings(), {"loaded": {}, "skipped": {}})

    def test_menus_of_what_this_server_has_not(self):
        self.assertEqual(self.api.get_hypernetworks(), [])
        self.assertEqual(self.api.get_face_restorers(), [])
        self.assertEqual(self.api.get_realesrgan_models(), [])
        memory = self.api.get_memory()
        self.assertGreater(memory["ram"]["used"], 0)
        self.assertGreater(memory["ram"]["total"], memory["ram"]["used"])
        self.assertEqual(memory["cuda"], {"error": "unavailable"})

    def test_cmd_flags(self):
        flags = self.api.get_cmd_flags()
        self.assertIs(flags["api"], True)
        self.assertEqual(flags["port"], int(SERVER.addr.rsplit(":", 1)[1]))
        self.assertEqual(flags["use_cpu"], ["all"])
        self.assertIs(flags["lowvram"], False)
        self.assertIsNone(flags["api_auth"])
        self.assertEqual(flags["vae_dir"], SERVER.vaes)

    def test_txt2img_samplers_seeds_and_iterations_equal_native(self):
        for sampler, scheduler, native_name, n_iter, schedule in [
            ("DPM++ 2M", "Karras", "dpmpp_2m_karras", 2, None),
            ("DPM++ 2M Karras", None, "dpmpp_2m_karras", 1, None),
            ("Euler a", None, "euler_a", 1, None),
            ("Euler a", "Karras", "euler_a_karras", 2, None),
            # A1111 1.9: DPM++ 2M SDE's automatic schedule is Exponential.
            ("DPM++ 2M SDE", None, "dpmpp_2m_sde", 1, "exponential"),
            ("Euler", "Beta", "euler", 1, "beta"),
            ("PLMS", None, "pndm", 1, None),
        ]:
            r = self.api.txt2img(
                prompt=PROMPT,
                negative_prompt=NEGATIVE,
                seed=41,
                steps=2,
                cfg_scale=5,
                width=SIZE,
                height=SIZE,
                sampler_name=sampler,
                scheduler=scheduler,
                n_iter=n_iter,
            )
            # info is a JSON string in the answer; the client parsed it into a dict.
            self.assertIsInstance(r.json["info"], str)
            self.assertEqual(r.info["all_seeds"], [41, 42][:n_iter], sampler)
            self.assertEqual(r.info["seed"], 41)
            self.assertEqual(len(r.images), n_iter)
            for img, seed, infotext in zip(r.images, r.info["all_seeds"], r.info["infotexts"]):
                (want,), meta = native(
                    prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=2,
                    guidance_scale=5, width=SIZE, height=SIZE, scheduler=native_name,
                    schedule=schedule,
                )
                self.assertEqual(meta["scheduler"], native_name)
                self.assertEqual(pixels(img), pixels(want), f"{sampler} seed {seed}")
                self.assertIn(f"Seed: {seed}", infotext)
                if native_name.endswith("_karras"):
                    self.assertIn("Schedule type: Karras", infotext)
                if schedule:
                    self.assertEqual(meta["schedule"], schedule)
                    self.assertIn(f"Schedule type: {schedule.capitalize()}", infotext)

    def test_tiling_and_variation_seeds_equal_native(self):
        # webuiapi's own keyword arguments: tiling, subseed, subseed_strength (A1111's names).
        r = self.api.txt2img(prompt=PROMPT, seed=41, steps=2, cfg_scale=5, width=SIZE,
                             height=SIZE, sampler_name="Euler", tiling=True, subseed=52,
                             subseed_strength=0.4, n_iter=2)
        # A1111's rule: the seed stays, the variation seed counts up.
        self.assertEqual(r.info["all_seeds"], [41, 41])
        self.assertEqual(r.info["all_subseeds"], [52, 53])
        self.assertEqual(r.info["subseed_strength"], 0.4)
        for img, subseed, infotext in zip(r.images, r.info["all_subseeds"], r.info["infotexts"]):
            (want,), meta = native(
                prompt=PROMPT, seed=41, steps=2, guidance_scale=5, width=SIZE, height=SIZE,
                scheduler="euler", tiling=True, variation_seed=subseed, variation_strength=0.4,
            )
            self.assertEqual(pixels(img), pixels(want), f"subseed {subseed}")
            self.assertEqual((meta["tiling"], meta["variation_seed"]), (True, subseed))
            self.assertIn(f"Variation seed: {subseed}, Variation seed strength: 0.4", infotext)
            self.assertIn("Tiling: True", infotext)

    def test_styles_equal_native_with_the_styles_written_out(self):
        # webuiapi's own `styles` argument; A1111 applies them in order.
        names = ["Appended", "Cinematic"]
        texts = {s["name"]: s for s in self.api.get_prompt_styles()}
        self.assertLessEqual(set(names), set(texts))
        fields = dict(seed=41, steps=2, width=SIZE, height=SIZE)
        r = self.api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=5,
                             sampler_name="Euler", styles=names, **fields)
        self.assertEqual(r.info["styles"], names)
        # The infotext's prompts are the styled ones: each style's text, the prompt in its
        # {prompt} or the text appended.
        styled = texts["Cinematic"]["prompt"].replace(
            "{prompt}", f"{PROMPT}, {texts['Appended']['prompt']}")
        styled_negative = ", ".join([NEGATIVE] + [texts[n]["negative_prompt"] for n in names])
        self.assertEqual((r.info["prompt"], r.info["negative_prompt"]), (styled, styled_negative))
        same = dict(guidance_scale=5, scheduler="euler", **fields)
        (written_out,), _ = native(prompt=styled, negative_prompt=styled_negative, **same)
        (by_name,), _ = native(prompt=PROMPT, negative_prompt=NEGATIVE, styles=names, **same)
        (plain,), _ = native(prompt=PROMPT, negative_prompt=NEGATIVE, **same)
        self.assertEqual(pixels(r.image), pixels(written_out))
        self.assertEqual(pixels(r.image), pixels(by_name))
        self.assertNotEqual(pixels(r.image), pixels(plain))

    def test_batch_size(self):
        if "batch_size" not in native_fields():
            self.skipTest("the native API has no batch_size yet")
        r = self.api.txt2img(prompt=PROMPT, seed=7, steps=2, width=SIZE, height=SIZE,
                             sampler_name="Euler", batch_size=2, n_iter=2)
        self.assertEqual(r.info["all_seeds"], [7, 8, 9, 10])
        wanted, _ = native(prompt=PROMPT, seed=9, steps=2, guidance_scale=7, width=SIZE,
                           height=SIZE, scheduler="euler", batch_size=2)
        self.assertEqual([pixels(i) for i in r.images[2:]], [pixels(i) for i in wanted])

    def test_unknown_sampler_is_a_422_listing_the_names(self):
        with self.assertRaises(RuntimeError) as cm:
            self.api.txt2img(prompt=PROMPT, steps=1, width=SIZE, height=SIZE,
                             sampler_name="DPM++ 3M SDE")
        status, text = cm.exception.args
        self.assertEqual(status, 422)
        self.assertIn("Euler a", text)
        self.assertIn("sampler_name", text)

    def test_img2img_equals_native(self):
        if "init_image" not in native_fields():
            self.skipTest("the native API has no init_image yet")
        (init,), _ = native(prompt="a red square", seed=3, steps=2, width=SIZE, height=SIZE)
        r = self.api.img2img(images=[init], prompt=PROMPT, seed=5, steps=4,
                             denoising_strength=0.5, cfg_scale=6, width=SIZE, height=SIZE,
                             sampler_name="Euler")
        (want,), meta = native(prompt=PROMPT, seed=5, steps=4, strength=0.5,
                               guidance_scale=6, width=SIZE, height=SIZE, scheduler="euler",
                               init_image=webuiapi.raw_b64_img(init))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertEqual(r.info["denoising_strength"], 0.5)

    def test_seed_resize_equals_native(self):
        if "seed_resize_from_width" not in native_fields():
            self.skipTest("the native API has no seed resize yet")
        # webuiapi's own keyword arguments (A1111's names), txt2img and img2img.
        r = self.api.txt2img(prompt=PROMPT, seed=41, steps=2, cfg_scale=5, width=SIZE,
                             height=SIZE, sampler_name="Euler", seed_resize_from_w=320,
                             seed_resize_from_h=192)
        (want,), meta = native(prompt=PROMPT, seed=41, steps=2, guidance_scale=5, width=SIZE,
                               height=SIZE, scheduler="euler", seed_resize_from_width=320,
                               seed_resize_from_height=192)
        (plain,), _ = native(prompt=PROMPT, seed=41, steps=2, guidance_scale=5, width=SIZE,
                             height=SIZE, scheduler="euler")
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertNotEqual(pixels(want), pixels(plain))
        self.assertEqual((meta["seed_resize_from_width"], meta["seed_resize_from_height"]),
                         (320, 192))
        self.assertEqual((r.info["seed_resize_from_w"], r.info["seed_resize_from_h"]), (320, 192))
        self.assertIn("Seed resize from: 320x192", r.info["infotexts"][0])
        r = self.api.img2img(images=[plain], prompt=PROMPT, seed=5, steps=4,
                             denoising_strength=0.5, cfg_scale=6, width=SIZE, height=SIZE,
                             sampler_name="Euler", seed_resize_from_w=384,
                             seed_resize_from_h=384)
        (want,), _ = native(prompt=PROMPT, seed=5, steps=4, strength=0.5, guidance_scale=6,
                            width=SIZE, height=SIZE, scheduler="euler",
                            init_image=webuiapi.raw_b64_img(plain),
                            seed_resize_from_width=384, seed_resize_from_height=384)
        self.assertEqual(pixels(r.image), pixels(want))

    def test_hires_fix_is_txt2img_resize_img2img(self):
        if "init_image" not in native_fields():
            self.skipTest("the native API has no init_image yet")
        # The smallest step up the size rules allow (256 to 320: the tiny model's attention at
        # 512 would cost this stage a minute).
        big = 320
        common = dict(prompt=PROMPT, seed=17, steps=2, cfg_scale=7, width=SIZE, height=SIZE,
                      sampler_name="Euler", enable_hr=True, hr_scale=1.25,
                      hr_second_pass_steps=4, denoising_strength=0.5)
        r = self.api.txt2img(hr_upscaler=webuiapi.HiResUpscaler.Latent, **common)
        self.assertEqual(r.image.size, (big, big))
        for key in ("Size: 256x256", "Denoising strength: 0.5", "Hires upscale: 1.25",
                    "Hires steps: 4", "Hires upscaler: Latent"):
            self.assertIn(key, r.info["infotexts"][0])
        self.assertEqual(r.info["denoising_strength"], 0.5)
        # Upscaler "None": the first pass's image, resized with Lanczos (Pillow's), then
        # img2img at the larger size with the same seed; pixel for pixel.
        r = self.api.txt2img(hr_upscaler=webuiapi.HiResUpscaler.none, **common)
        (low,), _ = native(prompt=PROMPT, seed=17, steps=2, guidance_scale=7, width=SIZE,
                           height=SIZE, scheduler="euler")
        up = low.resize((big, big), Image.LANCZOS)
        (want,), _ = native(prompt=PROMPT, seed=17, steps=4, strength=0.5, guidance_scale=7,
                            width=big, height=big, scheduler="euler",
                            init_image=b64_png(up))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertIn("Hires upscaler: None", r.info["infotexts"][0])
        # What it cannot do is a 422 that lists what it can.
        with self.assertRaises(RuntimeError) as cm:
            self.api.txt2img(hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, **common)
        status, text = cm.exception.args
        self.assertEqual(status, 422)
        self.assertIn("hr_upscaler", text)
        self.assertIn("Latent (nearest-exact)", text)
        # The hires fix takes the built-ins (UPSCALERS_DIR's models follow them, for Extras).
        self.assertEqual([u["name"] for u in self.api.get_upscalers()][:3], ["None", "Lanczos", "Nearest"])
        self.assertIn("Latent (bicubic antialiased)",
                      [m["name"] for m in self.api.get_latent_upscale_modes()])

    def test_prompt_left_out_is_empty_as_in_a1111(self):
        # webuiapi's txt2img defaults prompt and negative prompt to "", as A1111 does.
        r = self.api.txt2img(seed=13, steps=2, width=SIZE, height=SIZE, sampler_name="Euler")
        self.assertEqual(r.image.size, (SIZE, SIZE))
        self.assertEqual(r.info["prompt"], "")
        self.assertTrue(r.info["infotexts"][0].startswith("Steps: 2,"), r.info["infotexts"][0])
        # The same request with the empty prompt written out is the same image.
        again = self.api.txt2img(prompt="", seed=13, steps=2, width=SIZE, height=SIZE,
                                 sampler_name="Euler")
        self.assertEqual(pixels(again.image), pixels(r.image))

    def test_png_info_reads_the_parameters_back(self):
        r = self.api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=99, steps=1,
                             width=SIZE, height=SIZE, sampler_name="Euler")
        info = self.api.png_info(r.image)
        self.assertIsInstance(info.info, str)  # the infotext, not JSON
        self.assertTrue(info.info.startswith(PROMPT), info.info)
        params = info.json["parameters"]
        self.assertEqual(params["Seed"], "99")
        self.assertEqual(params["Steps"], "1")
        self.assertEqual(params["Negative prompt"], NEGATIVE)
        self.assertEqual((params["Size-1"], params["Size-2"]), (str(SIZE), str(SIZE)))

    def test_extras_upscale_as_a1111(self):
        # The fixtures of tools/make_extras_fixtures.py: A1111's own upscale code with Pillow.
        d = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "extras")
        cases = json.load(open(os.path.join(d, "extras.json")))["cases"]
        for label in ["to_200x100_crop", "blend_lanczos_nearest_0_35", "nearest_by_1_7_grey"]:
            case = cases[label]
            img = Image.open(os.path.join(d, f"input.{case['input']}.png"))
            r = self.api.extra_single_image(img, **case["fields"])
            want = Image.open(os.path.join(d, f"output.{label}.png"))
            self.assertEqual(r.image.size, want.size, label)
            self.assertEqual(pixels(r.image), pixels(want), label)
            self.assertEqual(r.info, case["html_info"], label)
        case = cases["lanczos_by_2"]
        img = Image.open(os.path.join(d, "input.rgb.png"))
        r = self.api.extra_batch_images([img, img], **case["fields"])
        want = pixels(Image.open(os.path.join(d, "output.lanczos_by_2.png")))
        self.assertEqual([pixels(i) for i in r.images], [want, want])
        with self.assertRaises(RuntimeError) as cm:
            self.api.extra_single_image(img, upscaler_1="R-ESRGAN 4x+")
        self.assertEqual(cm.exception.args[0], 422)

    def test_extras_with_an_esrgan_model_as_a1111(self):
        names = [u["name"] for u in self.api.get_upscalers()]
        self.assertEqual(names, ["None", "Lanczos", "Nearest", "4x-Tiny"])
        # A1111's Upscaler.upscale with the x4 model to 2.5 (tools/make_esrgan_fixtures.py),
        # within one level of float noise.
        img = Image.open(os.path.join(ESRGAN, "input.tall.png"))
        r = self.api.extra_single_image(img, upscaler_1="4x-Tiny", upscaling_resize=2.5)
        want = Image.open(os.path.join(ESRGAN, "upscale.x4_by_2_5.png"))
        self.assertEqual(r.image.size, want.size)
        diff = max(abs(a - b) for a, b in zip(pixels(r.image), pixels(want)))
        self.assertLessEqual(diff, 1)
        self.assertIn("Postprocess upscaler: 4x-Tiny", r.info)

    def test_progress_and_interrupt(self):
        result = {}

        def run():
            result["r"] = self.api.txt2img(prompt=PROMPT, seed=1, steps=8, width=SIZE,
                                           height=SIZE, sampler_name="Euler", n_iter=4)

        t = threading.Thread(target=run)
        t.start()
        seen = None
        deadline = time.time() + 120
        while time.time() < deadline and t.is_alive():
            p = self.api.get_progress()
            if p["progress"] > 0:
                seen = p
                break
            time.sleep(0.05)
        self.assertIsNotNone(seen, "progress never rose above 0")
        self.assertLess(seen["progress"], 1)
        self.assertEqual(seen["state"]["job_count"], 4)
        self.assertGreaterEqual(seen["eta_relative"], 0)
        t0 = time.time()
        self.assertEqual(self.api.interrupt(), {})
        t.join(60)
        self.assertFalse(t.is_alive(), "txt2img did not return after interrupt")
        stopped_in = time.time() - t0
        r = result["r"]
        # Interrupted before the last batch: fewer images, and info matches them.
        self.assertLess(len(r.images), 4)
        self.assertEqual(len(r.info["all_seeds"]), len(r.images))
        self.assertEqual(r.info["all_seeds"], list(range(1, 1 + len(r.images))))
        idle = self.api.get_progress()
        self.assertEqual((idle["progress"], idle["state"]["job_count"]), (0, 0))
        print(f"interrupt answered in {stopped_in:.2f} s", file=sys.stderr, end=" ")


class OpenAI(Timed):
    def setUp(self):
        super().setUp()
        # Any key: the server runs without API_KEYS, and the client insists on sending one.
        self.client = openai.OpenAI(base_url=SERVER.url + "/v1", api_key="sk-local")

    def test_generate_b64_equals_native(self):
        n = 2 if "batch_size" in native_fields() else 1
        r = self.client.images.generate(
            prompt=PROMPT, n=n, size=f"{SIZE}x{SIZE}", response_format="b64_json",
            extra_body={"seed": 11, "steps": 2, "negative_prompt": NEGATIVE,
                        "scheduler": "euler_a", "guidance_scale": 5},
        )
        self.assertEqual(len(r.data), n)
        self.assertGreater(r.created, 0)
        for i, d in enumerate(r.data):
            img = Image.open(io.BytesIO(base64.b64decode(d.b64_json)))
            (want,), _ = native(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11 + i, steps=2,
                                guidance_scale=5, width=SIZE, height=SIZE, scheduler="euler_a")
            self.assertEqual(pixels(img), pixels(want), f"image {i}")
            self.assertEqual(d.revised_prompt, PROMPT)

    def test_url_answers_the_same_png(self):
        kw = dict(prompt=PROMPT, size=f"{SIZE}x{SIZE}", extra_body={"seed": 12, "steps": 1})
        a = self.client.images.generate(response_format="url", **kw)
        b = self.client.images.generate(response_format="b64_json", **kw)
        got = requests.get(a.data[0].url)
        self.assertEqual(got.status_code, 200)
        self.assertEqual(got.headers["content-type"], "image/png")
        self.assertEqual(pixels(Image.open(io.BytesIO(got.content))),
                         pixels(Image.open(io.BytesIO(base64.b64decode(b.data[0].b64_json)))))

    def test_hires_in_extra_body_equals_native(self):
        doc = requests.get(SERVER.url + "/openapi.json").json()
        self.assertIn("hires", doc["components"]["schemas"]["openai.ImageGenerationRequest"]["properties"])
        # `size` is the first pass's; the image comes out at the hires size.
        hires = {"scale": 1.5, "upscaler": "Lanczos", "steps": 2, "strength": 0.5,
                 "scheduler": "dpmpp_2m", "prompt": PROMPT + ", sharp", "negative_prompt": "fog"}
        r = self.client.images.generate(
            prompt=PROMPT, size=f"{SIZE}x{SIZE}", response_format="b64_json",
            extra_body={"seed": 13, "steps": 2, "hires": hires},
        )
        got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        self.assertEqual(got.size, (SIZE * 3 // 2, SIZE * 3 // 2))
        (want,), meta = native(prompt=PROMPT, seed=13, steps=2, width=SIZE, height=SIZE, hires=hires)
        self.assertEqual(pixels(got), pixels(want))
        self.assertEqual(meta["hires"]["width"], SIZE * 3 // 2)
        # A broken hires rule: BadRequestError whose param names the hires key.
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}",
                                        extra_body={"hires": {"scale": 1.3}})
        self.assertEqual(cm.exception.body["param"], "hires.scale")
        self.assertIn("332.8", cm.exception.body["message"])

    def test_tiling_and_variation_seeds_in_extra_body_equal_native(self):
        extras = {"seed": 14, "steps": 2, "tiling": True, "variation_seed": 99,
                  "variation_strength": 0.3}
        r = self.client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}",
                                        response_format="b64_json", extra_body=extras)
        got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        (want,), meta = native(prompt=PROMPT, width=SIZE, height=SIZE, **extras)
        self.assertEqual(pixels(got), pixels(want))
        self.assertEqual((meta["tiling"], meta["variation_seed"]), (True, 99))
        (plain,), _ = native(prompt=PROMPT, width=SIZE, height=SIZE, seed=14, steps=2)
        self.assertNotEqual(pixels(got), pixels(plain))

    def test_bad_request_is_raised_as_bad_request_error(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.images.generate(prompt=PROMPT, size="1024x1024")
        e = cm.exception
        self.assertEqual(e.status_code, 400)
        self.assertEqual(e.body["param"], "size")
        self.assertEqual(e.body["type"], "invalid_request_error")
        self.assertIn("768", e.body["message"])

    def test_models(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertEqual(len(ids), 2)
        self.assertTrue(ids[0].startswith("tiny-b"), ids)
        self.assertEqual(ids[1], OTHER)
        self.assertEqual(self.client.models.retrieve(ids[0]).id, ids[0])

    def test_edit_with_transparent_mask_equals_native_inpaint(self):
        if "mask_image" not in native_fields():
            self.skipTest("the native API has no mask_image yet")
        (init,), _ = native(prompt="a red square", seed=3, steps=2, width=SIZE, height=SIZE)
        # OpenAI's mask: transparent = repaint (the left half here).
        mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), (0, 0, SIZE // 2, SIZE))
        files = {}
        for name, img in [("image", init), ("mask", mask)]:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            files[name] = (f"{name}.png", buf.getvalue(), "image/png")
        r = self.client.images.edit(
            image=files["image"], mask=files["mask"], prompt=PROMPT, size=f"{SIZE}x{SIZE}",
            response_format="b64_json",
            extra_body={"seed": 21, "steps": 4, "strength": 0.75},
        )
        got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        # The same mask natively: white = repaint.
        white_left = Image.new("L", (SIZE, SIZE), 0)
        white_left.paste(255, (0, 0, SIZE // 2, SIZE))
        (want,), meta = native(prompt=PROMPT, seed=21, steps=4, strength=0.75, width=SIZE,
                               height=SIZE, init_image=b64_png(init),
                               mask_image=b64_png(white_left))
        self.assertEqual(pixels(got), pixels(want))

    def test_edit_without_mask_is_img2img(self):
        if "init_image" not in native_fields():
            self.skipTest("the native API has no init_image yet")
        (init,), _ = native(prompt="a blue circle", seed=4, steps=2, width=SIZE, height=SIZE)
        buf = io.BytesIO()
        init.save(buf, format="PNG")
        r = self.client.images.edit(image=("i.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                                    extra_body={"seed": 8, "steps": 4})
        got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        (want,), _ = native(prompt=PROMPT, seed=8, steps=4, init_image=b64_png(init))
        self.assertEqual(got.size, (SIZE, SIZE))
        self.assertEqual(pixels(got), pixels(want))


if __name__ == "__main__":
    unittest.main(verbosity=2)
