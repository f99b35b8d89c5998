"""AUTOMATIC1111's images-in requests through the real, unmodified `webuiapi` package: img2img,
inpainting, seed resize, the hires fix and the extras upscalers, each equal to the native
request's pixels or to A1111's own fixtures (clientkit.py runs the server). By hand:
SDSERVE_BIN=target/debug/sdserve python tests/clients/test_webuiapi_images.py
"""
import json
import os
import sys

import webuiapi
from PIL import Image

import clientkit as kit
from clientkit import ESRGAN, PROMPT, ROOT, SIZE, native, native_fields, pixels
from test_webuiapi import WebUIApiCase


class A1111ImagesIn(WebUIApiCase):
    def test_img2img_equals_native(self):
        if "init_image" not in native_fields():
            self.skipTest("the native API has no init_image yet")
        (init,), _ = native(prompt="a red square", seed=3, steps=2, width=SIZE, height=SIZE)
        r = self.api.img2img(images=[init], prompt=PROMPT, seed=5, steps=4,
                             denoising_strength=0.5, cfg_scale=6, width=SIZE, height=SIZE,
                             sampler_name="Euler")
        # A1111's step rule (4 steps at 0.5: 3 from index 1), natively `step_rule`.
        (want,), meta = native(prompt=PROMPT, seed=5, steps=4, strength=0.5,
                               guidance_scale=6, width=SIZE, height=SIZE, scheduler="euler",
                               init_image=webuiapi.raw_b64_img(init), step_rule="a1111")
        (other,), _ = native(prompt=PROMPT, seed=5, steps=4, strength=0.5, guidance_scale=6,
                             width=SIZE, height=SIZE, scheduler="euler",
                             init_image=webuiapi.raw_b64_img(init))
        self.assertNotEqual(pixels(other), pixels(want))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertEqual(r.info["denoising_strength"], 0.5)

    def test_inpainting_equals_native_and_keeps_unmasked_pixels(self):
        if "inpaint" not in native_fields():
            self.skipTest("the native API has no A1111 inpainting yet")
        # A larger picture than the request's size, a small mask on it.
        init = Image.new("RGB", (384, 320))
        init.putdata([(x * 255 // 383, y * 255 // 319, (x + y) % 256)
                      for y in range(320) for x in range(384)])
        mask = Image.new("RGB", (384, 320))
        mask.paste((255, 255, 255), (250, 60, 310, 140))
        common = dict(prompt=PROMPT, seed=5, steps=3, denoising_strength=0.75, cfg_scale=6,
                      width=SIZE, height=SIZE, sampler_name="Euler")
        native_common = dict(prompt=PROMPT, seed=5, steps=3, strength=0.75, guidance_scale=6,
                             width=SIZE, height=SIZE, scheduler="euler",
                             init_image=webuiapi.raw_b64_img(init),
                             mask_image=webuiapi.raw_b64_img(mask), step_rule="a1111")
        # webuiapi's defaults: blur 4, fill, only masked with padding 0.
        r = self.api.img2img(images=[init], mask_image=mask, **common)
        (want,), meta = native(**native_common, inpaint={
            "mask_blur": 4, "masked_content": "fill", "area": "only_masked", "padding": 0})
        self.assertEqual(r.image.size, (384, 320))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertEqual((meta["image_width"], meta["image_height"]), (384, 320))
        self.assertIn("Mask blur: 4, Inpaint area: Only masked, Masked area padding: 0, "
                      "Masked content: fill", r.info["infotexts"][0])
        # Far from the mask, the picture comes back exactly as sent.
        for xy in [(0, 0), (100, 300), (383, 319), (200, 60)]:
            self.assertEqual(r.image.getpixel(xy), init.getpixel(xy), xy)
        # Each option by webuiapi's own keyword arguments.
        r = self.api.img2img(images=[init], mask_image=mask, mask_blur=2, inpainting_fill=1,
                             inpaint_full_res=False, inpaint_full_res_padding=16,
                             inpainting_mask_invert=1, **common)
        (want,), _ = native(**native_common, inpaint={
            "mask_blur": 2, "masked_content": "original", "area": "whole", "padding": 16,
            "mask_invert": True})
        self.assertEqual(r.image.size, (SIZE, SIZE))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertIn("Mask mode: Inpaint not masked, Mask blur: 2", r.info["infotexts"][0])

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
                            seed_resize_from_width=384, seed_resize_from_height=384,
                            step_rule="a1111")
        self.assertEqual(pixels(r.image), pixels(want))

    def test_hires_fix_is_the_native_hires_pass(self):
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
        # Upscaler "None": the native hires pass with the same fields, pixel for pixel (the
        # pass itself, A1111's upscale step between diffusers' passes, is held to A1111's own
        # sample_hr_pass in the pipeline's tests: crates/pipeline/tests/integration/hires.rs).
        r = self.api.txt2img(hr_upscaler=webuiapi.HiResUpscaler.none, **common)
        (want,), _ = native(prompt=PROMPT, seed=17, steps=2, guidance_scale=7, width=SIZE,
                            height=SIZE, scheduler="euler",
                            hires={"scale": 1.25, "upscaler": "None", "steps": 4,
                                   "strength": 0.5}, step_rule="a1111")
        self.assertEqual(want.size, (big, big))
        self.assertEqual(pixels(r.image), pixels(want))
        self.assertIn("Hires upscaler: None", r.info["infotexts"][0])
        # What it cannot do is a 422 that lists what it can.
        with self.assertRaises(RuntimeError) as cm:
            self.api.txt2img(hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x, **common)
        status, text = cm.exception.args
        self.assertEqual(status, 422)
        self.assertIn("hr_upscaler", text)
        self.assertIn("Latent (nearest-exact)", text)
        self.assertIn("4x-Tiny", text)
        # An UPSCALERS_DIR model by its name, as A1111 users set hr_upscaler: the native
        # hires.upscaler's image, pixel for pixel.
        r = self.api.txt2img(hr_upscaler="4x-Tiny", **common)
        self.assertEqual(r.image.size, (big, big))
        self.assertIn("Hires upscaler: 4x-Tiny", r.info["infotexts"][0])
        (want,), meta = native(prompt=PROMPT, seed=17, steps=2, guidance_scale=7, width=SIZE,
                               height=SIZE, scheduler="euler",
                               hires={"scale": 1.25, "upscaler": "4x-Tiny", "steps": 4,
                                      "strength": 0.5}, step_rule="a1111")
        self.assertEqual(meta["hires"]["upscaler"], "4x-Tiny")
        self.assertEqual(pixels(r.image), pixels(want))
        # The hires fix takes the built-ins and UPSCALERS_DIR's models.
        self.assertEqual([u["name"] for u in self.api.get_upscalers()],
                         ["None", "Lanczos", "Nearest", "4x-Tiny"])
        self.assertIn("Latent (bicubic antialiased)",
                      [m["name"] for m in self.api.get_latent_upscale_modes()])

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


if __name__ == "__main__":
    kit.main([sys.modules[__name__]])
