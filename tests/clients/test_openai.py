"""OpenAI's /v1 through the real, unmodified `openai` package (clientkit.py runs the server).
By hand: SDSERVE_BIN=target/debug/sdserve python tests/clients/test_openai.py
"""
import base64
import io
import sys
import warnings

import openai
import requests
from PIL import Image

import clientkit as kit
from clientkit import NEGATIVE, OTHER, PROMPT, SIZE, Timed, b64_png, native, native_fields, pixels


class OpenAI(Timed):
    def setUp(self):
        super().setUp()
        # Any key: the server runs without API_KEYS, and the client insists on sending one.
        self.client = openai.OpenAI(base_url=kit.SERVER.url + "/v1", api_key="sk-local")

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
        doc = requests.get(kit.SERVER.url + "/openapi.json").json()
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


    def test_variation_is_img2img_of_the_image(self):
        if "init_image" not in native_fields():
            self.skipTest("the native API has no init_image yet")
        # The package marks create_variation deprecated (DALL-E 2's route); it still sends it.
        warnings.filterwarnings("ignore", "deprecated", DeprecationWarning)
        (init,), _ = native(prompt="a green triangle", seed=5, steps=2, width=SIZE, height=SIZE)
        buf = io.BytesIO()
        init.save(buf, format="PNG")
        r = self.client.images.create_variation(
            image=("i.png", buf.getvalue(), "image/png"), n=1, response_format="b64_json",
            extra_body={"seed": 9, "steps": 3, "prompt": PROMPT})
        got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        # The default strength: A1111's img2img default, 0.75.
        (want,), _ = native(prompt=PROMPT, seed=9, steps=3, strength=0.75,
                            init_image=b64_png(init))
        self.assertEqual(got.size, (SIZE, SIZE))
        self.assertEqual(pixels(got), pixels(want))
        # Without a prompt, DALL-E 2's default answer: a URL.
        r = self.client.images.create_variation(image=("i.png", buf.getvalue(), "image/png"),
                                                extra_body={"seed": 9, "steps": 3})
        got = requests.get(r.data[0].url)
        self.assertEqual(got.status_code, 200)
        self.assertEqual(Image.open(io.BytesIO(got.content)).size, (SIZE, SIZE))
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.images.create_variation(image=("i.png", buf.getvalue(), "image/png"),
                                                extra_body={"strength": 3})
        self.assertEqual(e.exception.body["param"], "strength")

if __name__ == "__main__":
    kit.main([sys.modules[__name__]])
