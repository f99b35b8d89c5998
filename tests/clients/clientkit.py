"""What the client tests share (test_webuiapi*.py, test_openai.py): the fixtures' paths, the
`sdserve serve` they run against on the tiny test model, and the native answers they compare
with. Every image that comes through a dialect must hold exactly the pixels that the native
`POST /generate` gives for the same parameters (PNG decoded, pixels compared).
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

import requests
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
# Tiny ControlNets for tiny-a-vae8 (tools/make_controlnet_fixtures.py) and their control images.
CONTROLNETS = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "controlnet")
IMAGES = os.path.join(ROOT, "crates", "pipeline", "tests", "fixtures", "images")
# ESRGAN models for the Extras (tools/make_esrgan_fixtures.py).
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
        self.controlnets = os.path.join(self.cache, "controlnet")
        shutil.copytree(CONTROLNETS, self.controlnets)
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
            "CONTROLNET_DIR": self.controlnets,
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


# The one server every dialect's tests talk to (`main` starts and stops it).
SERVER = None


def main(modules):
    """Runs the tests of `modules` against one server started for them all; exits non-zero
    when any fails."""
    global SERVER
    SERVER = Server()
    try:
        loader = unittest.TestLoader()
        suite = unittest.TestSuite(loader.loadTestsFromModule(m) for m in modules)
        result = unittest.TextTestRunner(verbosity=2).run(suite)
    finally:
        SERVER.stop()
    sys.exit(0 if result.wasSuccessful() else 1)


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
