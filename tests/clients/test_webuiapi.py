"""AUTOMATIC1111's /sdapi/v1 through the real, unmodified `webuiapi` package (clientkit.py runs
the server). By hand: SDSERVE_BIN=target/debug/sdserve python tests/clients/test_webuiapi.py
"""
import json
import os
import shutil
import struct
import sys
import threading
import time

import requests
import webuiapi
from PIL import Image

import clientkit as kit
from clientkit import (ADAPTERS, MODEL, NEGATIVE, OTHER, PROMPT, SIZE, Timed, b64_png, native,
                       native_fields, pixels)


class WebUIApiCase(Timed):
    """A test case with `self.api`, the webuiapi client of the test server (no tests of its
    own: test_webuiapi_images.py's cases share it)."""

    def setUp(self):
        super().setUp()
        host, port = kit.SERVER.addr.rsplit(":", 1)
        # Exactly how a script builds the client; its defaults: sampler "Euler a",
        # scheduler "automatic", 20 steps.
        self.api = webuiapi.WebUIApi(host=host, port=int(port))


class A1111(WebUIApiCase):
    def test_idle_progress_and_lists(self):
        p = self.api.get_progress()
        self.assertEqual(p["progress"], 0)
        self.assertEqual(p["state"]["job_count"], 0)
        self.api.util_wait_for_ready(check_interval=0.1)  # returns at once when idle
        names = self.api.util_get_sampler_names()
        self.assertEqual(
            names,
            sorted(["Euler a", "Euler", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ SDE", "DDIM", "PLMS", "LMS",
                    "UniPC", "Heun", "DPM2", "DPM2 a", "Restart", "LCM", "DPM++ 2S a", "DPM++ 3M SDE",
                    "DPM fast", "DPM adaptive", "DDIM CFG++"]),
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
        self.assertIsNone(self.api.refresh_checkpoints())  # A1111 answers null
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
        shutil.copy(os.path.join(os.path.dirname(MODEL), "vae", vae), kit.SERVER.vaes)
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
        lora = os.path.join(kit.SERVER.loras, "ink_kohya.safetensors")
        shutil.copy(os.path.join(ADAPTERS, "loras", "ink_kohya.safetensors"), lora)
        # tinystyle's vectors are 32 wide (tiny-a's text encoder): not tiny-b's 48, so skipped.
        shutil.copy(os.path.join(ADAPTERS, "embeddings", "tinystyle.pt"), kit.SERVER.embeddings)
        # One vector of tiny-b's width, written as a textual-inversion .safetensors.
        header = json.dumps(
            {"emb_params": {"dtype": "F32", "shape": [1, 48], "data_offsets": [0, 192]}}
        ).encode()
        with open(os.path.join(kit.SERVER.embeddings, "wide48.safetensors"), "wb") as f:
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
        for name in os.listdir(kit.SERVER.embeddings):
            os.remove(os.path.join(kit.SERVER.embeddings, name))
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
        self.assertEqual(flags["port"], int(kit.SERVER.addr.rsplit(":", 1)[1]))
        self.assertEqual(flags["use_cpu"], ["all"])
        self.assertIs(flags["lowvram"], False)
        self.assertIsNone(flags["api_auth"])
        self.assertEqual(flags["vae_dir"], kit.SERVER.vaes)

    def test_txt2img_samplers_seeds_and_iterations_equal_native(self):
        for sampler, scheduler, native_name, n_iter, schedule in [
            ("DPM++ 2M", "Karras", "dpmpp_2m_karras", 2, None),
            ("DPM++ 2M Karras", None, "dpmpp_2m_karras", 1, None),
            ("Euler a", None, "euler_a", 1, None),
            ("Euler a", "Karras", "euler_a_karras", 2, None),
            # A1111 1.9: DPM++ 2M SDE's automatic schedule is Exponential.
            # A1111's noise for them: Brownian trees (the native _brownian names).
            ("DPM++ 2M SDE", None, "dpmpp_2m_sde_brownian", 1, "exponential"),
            ("DPM++ 2M SDE Heun", "Karras", "dpmpp_2m_sde_heun_brownian_karras", 1, None),
            # k-diffusion's own: 2S a's automatic schedule is Karras, 3M SDE's Exponential.
            ("DPM++ 2S a", None, "dpmpp_2s_ancestral_karras", 1, None),
            ("DPM++ 3M SDE", None, "dpmpp_3m_sde", 1, "exponential"),
            # k-diffusion's DPM-Solver-Fast, between the sigmas' ends.
            ("DPM fast", None, "dpm_fast", 1, None),
            ("DPM adaptive", None, "dpm_adaptive", 1, None),
            ("Euler", "Beta", "euler", 1, "beta"),
            # A1111's own timestep sampler, not diffusers' PNDM.
            ("PLMS", None, "plms_a1111", 1, None),
            ("DDIM", None, "ddim_a1111", 1, None),
            # A1111's DDIM CFG++ (the negative prompt's prediction as the direction).
            ("DDIM CFG++", None, "ddim_cfgpp", 1, None),
            # A1111's own UniPC (bh1, order 3), not diffusers' unipc.
            ("UniPC", None, "unipc_a1111", 1, None),
            # A1111 1.10 lists Restart with the Karras schedule.
            ("Restart", None, "restart_karras", 1, None),
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
                # webuiapi sends eta 1.0 with every request, and A1111 gives it to the
                # samplers that take one: DDIM then adds noise at every update.
                (want,), meta = native(
                    prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=2,
                    guidance_scale=5, width=SIZE, height=SIZE, scheduler=native_name,
                    schedule=schedule, eta=1.0,
                )
                self.assertEqual(meta["scheduler"], native_name)
                self.assertEqual(pixels(img), pixels(want), f"{sampler} seed {seed}")
                self.assertIn(f"Seed: {seed}", infotext)
                # A1111 writes the eta that is not the sampler's default (DDIM's is 0).
                ddim = sampler.startswith("DDIM")
                self.assertEqual("Eta DDIM: 1.0" in infotext, ddim, infotext)
                if ddim:
                    (eta0,), _ = native(
                        prompt=PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=2,
                        guidance_scale=5, width=SIZE, height=SIZE, scheduler=native_name)
                    self.assertNotEqual(pixels(img), pixels(eta0), "DDIM with eta 1")
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
                             sampler_name="DPM++ 4M")
        status, text = cm.exception.args
        self.assertEqual(status, 422)
        self.assertIn("Euler a", text)
        self.assertIn("sampler_name", text)

    def test_controlnet_units_equal_native_controlnets(self):
        # The sd-webui-controlnet extension's API, through webuiapi's own ControlNetUnit.
        self.assertEqual(self.api.controlnet_version(), 2)
        names = self.api.controlnet_model_list()
        ldm = [n for n in names if n.startswith("cn-a-ldm [")]
        self.assertEqual(len(ldm), 1, names)
        self.assertIn("cn-a", names)  # a diffusers folder: its name alone
        # webuiapi hands back the server's list as it is, in the extension's names and order.
        modules = self.api.controlnet_module_list()
        raw = requests.get(kit.SERVER.url + "/controlnet/module_list").json()["module_list"]
        self.assertEqual(modules, raw)
        self.assertEqual(modules[0], "none")
        for name in ["canny", "tile_resample", "shuffle", "hed"]:
            self.assertIn(name, modules)
        control = Image.open(os.path.join(kit.IMAGES, "control-80x48.png")).convert("RGB")
        models = self.api.get_sd_models()
        default, other = models[0]["title"], models[1]["title"]
        # A fresh `alwayson_scripts` each call: webuiapi's default dict is shared, and the units
        # put in it would stay for every later call of the process.
        def txt2img(unit):
            return self.api.txt2img(
                prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=4, cfg_scale=6,
                width=SIZE, height=SIZE, sampler_name="Euler", alwayson_scripts={},
                controlnet_units=[unit]).image
        # 4 steps: a window of 0.1..0.8 steers steps 1 and 2 (diffusers' controlnet_keep).
        want_fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=4,
                           guidance_scale=6, width=SIZE, height=SIZE, scheduler="euler",
                           model=OTHER)
        try:
            # The ControlNets are tiny-a-vae8's (tiny-b's UNet has other widths).
            self.api.util_set_model(other)
            unit = webuiapi.ControlNetUnit(image=control, model=ldm[0], weight=0.7,
                                           guidance_start=0.1, guidance_end=0.8,
                                           resize_mode="Just Resize")
            got = txt2img(unit)
            (want,), meta = native(controlnets=[{
                "model": "cn-a-ldm", "image": b64_png(control), "scale": 0.7,
                "guidance_start": 0.1, "guidance_end": 0.8}], **want_fields)
            self.assertEqual(meta["controlnets"][0]["model"], "cn-a-ldm")
            self.assertEqual(pixels(got), pixels(want))
            (plain,), _ = native(**want_fields)
            self.assertNotEqual(pixels(got), pixels(plain))
            # Crop and Resize (the extension's default) covers the size and crops the centre:
            # k = max(256 / 48, 256 / 80), sides round(80 k) x round(48 k), PIL's Lanczos.
            k = max(SIZE / 48, SIZE / 80)
            w, h = round(80 * k), round(48 * k)
            cropped = control.resize((w, h), Image.LANCZOS)
            left, top = max(0, (w - SIZE) // 2), max(0, (h - SIZE) // 2)
            cropped = cropped.crop((left, top, left + SIZE, top + SIZE))
            unit = webuiapi.ControlNetUnit(image=control, model="cn-a", resize_mode="Crop and Resize")
            got = txt2img(unit)
            (want,), _ = native(controlnets=[{"model": "cn-a", "image": b64_png(cropped)}],
                               **want_fields)
            self.assertEqual(pixels(got), pixels(want))
            # module canny: the map made from the image first, as the native preprocessor.
            unit = webuiapi.ControlNetUnit(image=control, model="cn-a", module="canny",
                                           processor_res=64, threshold_a=50, threshold_b=100,
                                           resize_mode="Just Resize")
            got = txt2img(unit)
            (want,), meta = native(controlnets=[{"model": "cn-a", "image": b64_png(control),
                                                 "preprocessor": {"type": "canny",
                                                                  "low_threshold": 50,
                                                                  "high_threshold": 100,
                                                                  "resolution": 64}}],
                                   **want_fields)
            self.assertEqual(meta["controlnets"][0]["preprocessor"]["type"], "canny")
            self.assertEqual(pixels(got), pixels(want))
            # /controlnet/detect (webuiapi's controlnet_detect) answers that map: sent with
            # module none it steers as the canny unit did. 80x48 at 64: 107x64.
            r = self.api.controlnet_detect([control], module="canny", processor_res=64,
                                           threshold_a=50, threshold_b=100)
            self.assertEqual(r.info, "Success")
            (edges,) = r.images
            self.assertEqual(edges.size, (107, 64))
            self.assertEqual(set(edges.convert("L").getdata()), {0, 255})
            unit = webuiapi.ControlNetUnit(image=edges.convert("RGB"), model="cn-a",
                                           resize_mode="Just Resize")
            self.assertEqual(pixels(txt2img(unit)), pixels(got))
            # A model-based preprocessor is a 422 naming the unit's field and the modules.
            with self.assertRaises(RuntimeError) as cm:
                txt2img(webuiapi.ControlNetUnit(image=control, model="cn-a", module="depth_zoe"))
            status, text = cm.exception.args
            self.assertEqual(status, 422)
            self.assertIn("alwayson_scripts.controlnet.args", text)
            self.assertIn("depth_zoe", text)
        finally:
            self.api.util_set_model(default)

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


if __name__ == "__main__":
    kit.main([sys.modules[__name__]])
