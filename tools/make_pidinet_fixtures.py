#!/usr/bin/env python3
"""References for the sd-webui-controlnet extension's PiDiNet preprocessors (softedge_pidinet,
softedge_pidisafe, scribble_pidinet; crates/pipeline/src/controlnet/preprocess/pidinet.rs), run
as the extension runs them: its own code from a checkout:
  annotator/pidinet/model.py: the whole file (createConvFunc's pixel-difference convolutions,
      PDCBlock, CDCM, CSAM, MapReduce, PiDiNet, config_model), imported with its `modules.devices`
      given as the CPU
  annotator/pidinet/__init__.py: apply_pidinet (BGR / 255, the network's last output, safe_step)
  annotator/util.py: safe_step, nms, HWC3
  scripts/preprocessor/legacy/processor.py: pad64, safer_memory, resize_image_with_pad, pidinet,
      pidinet_safe, scribble_pidinet (the legacy `call_function`s; LegacyPreprocessor then
      applies HWC3)
No weights are downloaded: the network is the extension's `PiDiNet` with `pidinet()`'s config
(carv4, sa=True, dil) and random weights from a fixed torch seed. The real table5_pidinet.pth
(inplane 60, dil 24) is 2.8 MB; the committed one has inplane 4 and dil 8 (our loader reads both
from the shapes), unconverted pixel-difference weights as the extension loads them, saved as
{"epoch", "state_dict": {"module.<name>": tensor}} (the real file's DataParallel names, which
apply_pidinet strips). Biases are drawn too (the class zeroes most), and the side maps' weights
scaled so the fused logits spread over about -4..4.

Writes crates/pipeline/tests/fixtures/pidinet/:
  table5_pidinet.pth          the checkpoint, saved with torch.save
  pidinet.safetensors         image.<n> (uint8 HxWx3), padded.<n>.<res> (the padded image),
                              logits.<n>.<res> (f32: the classifier's output on the padded
                              image, before the sigmoid), <module>.<n>.<res> (uint8 HxWx3)
  pidinet.json                the cases and the sha256 of each source used
Run from the repository root:
  python3 tools/make_pidinet_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without one the script says so and writes nothing).
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys
import types

import cv2
import numpy as np
import torch
from einops import rearrange
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import functions  # noqa: E402
from make_preprocess_fixtures import photo  # noqa: E402
from make_preprocess_module_fixtures import sketch  # noqa: E402

OUT = os.path.join("crates", "pipeline", "tests", "fixtures", "pidinet")
INPLANE = 4
DIL = 8
SEED = 20240611

IMAGES = {
    "sketch": lambda: sketch(58, 47),
    "wide": lambda: photo(37, 52, 1, 3.0),
    "tall": lambda: photo(45, 33, 2, 25.0),
}
# Shrinking (the area resize), the image's own size, enlarging (cubic).
RESOLUTIONS = {"sketch": [40, 47, 64], "wide": [30, 64], "tall": [33, 20]}
MODULES = ["softedge_pidinet", "softedge_pidisafe", "scribble_pidinet"]
CPU = types.SimpleNamespace(get_device_for=lambda _: "cpu")


def model_module(ext):
    """annotator/pidinet/model.py imported as it is, `from modules import devices` the CPU."""
    modules = types.ModuleType("modules")
    modules.devices = CPU
    sys.modules["modules"] = modules
    path = os.path.join(ext, "annotator", "pidinet", "model.py")
    spec = importlib.util.spec_from_file_location("pidinet_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return mod, digest


def network(model):
    """`pidinet()`'s network (carv4, sa, dil) at INPLANE and DIL, random weights from SEED."""
    torch.manual_seed(SEED)
    net = model.PiDiNet(INPLANE, model.config_model("carv4"), dil=DIL, sa=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.2, 0.2)
        # The side maps scaled up: a random network's fused map barely leaves 0, where the
        # sigmoid, safe_step and scribble's threshold would test little.
        for i, scale in enumerate([60.0, 50.0, 40.0, 30.0]):
            net.conv_reduces[i].conv.weight.mul_(scale)
        net.classifier.weight.copy_(torch.tensor([1.0, 0.8, -0.6, 0.7]).reshape(1, 4, 1, 1))
        net.classifier.bias.fill_(0.3)
    return net.float().eval()


def load(ext):
    model, model_digest = model_module(ext)
    digests = {"annotator/pidinet/model.py": model_digest}
    util, d_util = functions(os.path.join(ext, "annotator", "util.py"), ["HWC3", "safe_step", "nms"],
                             {"cv2": cv2, "np": np})
    digests.update(d_util)
    net = network(model)
    # apply_pidinet with its model already loaded (the global it reads) on the CPU.
    ns = {"torch": torch, "np": np, "rearrange": rearrange, "os": os, "netNetwork": net,
          "safe_step": util["safe_step"], "devices": CPU}
    f, d = functions(os.path.join(ext, "annotator", "pidinet", "__init__.py"), ["apply_pidinet"], ns)
    digests.update(d)
    # The legacy functions import apply_pidinet and nms from the extension; given here instead.
    annotator_pidinet = types.ModuleType("annotator.pidinet")
    annotator_pidinet.apply_pidinet = f["apply_pidinet"]
    annotator_util = types.ModuleType("annotator.util")
    annotator_util.nms = util["nms"]
    sys.modules.setdefault("annotator", types.ModuleType("annotator"))
    sys.modules["annotator.pidinet"] = annotator_pidinet
    sys.modules["annotator.util"] = annotator_util
    ns_legacy = {"cv2": cv2, "np": np, "HWC3": util["HWC3"], "model_pidinet": None}
    legacy, d_legacy = functions(
        os.path.join(ext, "scripts", "preprocessor", "legacy", "processor.py"),
        ["pad64", "safer_memory", "resize_image_with_pad", "pidinet", "pidinet_safe", "scribble_pidinet"],
        ns_legacy)
    digests.update(d_legacy)
    hwc3 = util["HWC3"]

    def legacy_call(fn):
        def run(img, res):
            result, is_image = fn(img, res=res)
            return hwc3(result) if is_image else result
        return run

    modules = {
        "softedge_pidinet": legacy_call(legacy["pidinet"]),
        "softedge_pidisafe": legacy_call(legacy["pidinet_safe"]),
        "scribble_pidinet": legacy_call(legacy["scribble_pidinet"]),
    }

    def logits(padded):
        # apply_pidinet's input; the classifier's output caught before the sigmoid.
        caught = []
        hook = net.classifier.register_forward_hook(lambda _m, _i, out: caught.append(out))
        with torch.no_grad():
            x = torch.from_numpy(padded[:, :, ::-1].copy()).float() / 255.0
            net(rearrange(x, "h w c -> 1 c h w"))
        hook.remove()
        return caught[0].numpy()[0, 0]

    return net, modules, legacy["resize_image_with_pad"], logits, digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"),
                    help="a checkout of sd-webui-controlnet (default: $SD_WEBUI_CONTROLNET_DIR)")
    args = ap.parse_args()
    if not args.extension:
        print("make_pidinet_fixtures.py: skipped (needs --extension or SD_WEBUI_CONTROLNET_DIR)")
        return
    assert cv2.__version__ == "4.10.0", cv2.__version__
    torch.set_num_threads(1)
    net, modules, resize_image_with_pad, logits, digests = load(args.extension)
    os.makedirs(OUT, exist_ok=True)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"epoch": 14, "state_dict": state}, os.path.join(OUT, "table5_pidinet.pth"))
    tensors, cases = {}, []
    for name, make in IMAGES.items():
        img = make()
        tensors[f"image.{name}"] = torch.from_numpy(img.copy())
        for res in RESOLUTIONS[name]:
            padded, _ = resize_image_with_pad(img, res)
            tensors[f"padded.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(padded))
            lg = logits(padded)
            tensors[f"logits.{name}.{res}"] = torch.from_numpy(np.ascontiguousarray(lg))
            print(f"{name} {res}: logits {lg.min():.2f}..{lg.max():.2f}, std {lg.std():.2f}")
            for module in MODULES:
                out = modules[module](img.copy(), res)
                assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, (module, out.shape)
                k = f"{module}.{name}.{res}"
                tensors[k] = torch.from_numpy(np.ascontiguousarray(out))
                print(f"  {module}: {len(np.unique(out))} levels, {(out[..., 0] == 255).mean():.2f} white")
                cases.append({"module": module, "image": name, "resolution": res, "key": k})
    save_file(tensors, os.path.join(OUT, "pidinet.safetensors"))
    with open(os.path.join(OUT, "pidinet.json"), "w") as f:
        json.dump({"opencv": cv2.__version__, "numpy": np.__version__, "torch": torch.__version__,
                   "seed": SEED, "inplane": INPLANE, "dil": DIL,
                   "extension_sources": {k: f"sha256 {v}" for k, v in digests.items()},
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} cases to {OUT}/")


if __name__ == "__main__":
    main()
