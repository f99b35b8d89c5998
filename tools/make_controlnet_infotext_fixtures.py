#!/usr/bin/env python3
"""The sd-webui-controlnet extension's infotext entry of a unit (`ControlNet N: "..."`), made by
the extension's own code from API unit dicts, and its own parser run on each entry.

Runs, as they are (imported, not copied): internal_controlnet/args.py (ControlNetUnit.from_dict,
its validators with `bound_check_params`, `serialize`, `parse`), scripts/supported_preprocessor.py
and the preprocessor registry it fills (scripts/preprocessor/model_free_preprocessors.py,
inpaint.py, lama_inpaint.py, teed.py, legacy/legacy_preprocessors.py: the sliders the bound
check reads), with the extension's own hooks (external_code.py: any model; a module the
registry knows). A1111's modules that import touches (shared, devices, safe, modelloader) are
stubs; the extension runs under A1111 1.8's pydantic 1 (`pydantic.v1` here).

Writes crates/server/tests/fixtures/controlnet-infotext/units.json: [{unit, infotext, parsed}]
(the unit as an API client sends it, the extension's entry for it, and `parse(entry)`'s
fields serialised again; null for an empty entry, which its parser cannot read). controlnet_infotext's tests build our entry from each unit and
compare it with `infotext`.
Run from the repository root with tools/requirements.txt's venv:
  python3 tools/make_controlnet_infotext_fixtures.py --extension /path/to/sd-webui-controlnet
(default: $SD_WEBUI_CONTROLNET_DIR; without it the script says so and writes nothing).
With `--check FILE` it writes nothing: it runs the extension's parser on each line of FILE
(an entry, as our infotext writes it) and fails on one it refuses.
"""
import argparse
import json
import os
import sys
import types

OUT = os.path.join("crates", "server", "tests", "fixtures", "controlnet-infotext", "units.json")

# The modules sdserve runs (crates/server/src/api/a1111/controlnet_modules.rs's MODULES).
MODULES = [
    "none", "tile_resample", "pidinet", "pidinet_scribble", "reference_only",
    "recolor_luminance", "openpose_full", "normal_bae", "mlsd", "lineart_standard",
    "inpaint_only", "depth", "canny", "invert", "threshold", "color", "softedge_teed",
    "pidinet_safe", "hed_safe", "hed", "softedge_anyline", "shuffle", "scribble_xdog",
    "scribble_hed", "reference_adain+attn", "reference_adain", "recolor_intensity",
    "openpose_hand", "openpose_faceonly", "openpose_face", "openpose", "normal_map", "lineart",
    "lineart_coarse", "lineart_anime_denoise", "lineart_anime", "inpaint_only+lama", "inpaint",
    "depth_leres", "depth_anything_v2", "depth_anything", "blur_gaussian",
]


def load(ext):
    """The extension's ControlNetUnit with its hooks, and its preprocessor registry."""
    import pydantic.v1

    sys.modules["pydantic"] = pydantic.v1
    sys.path.insert(0, ext)
    stub = lambda name, **attrs: sys.modules.setdefault(name, types.ModuleType(name)).__dict__.update(attrs)  # noqa: E731
    stub("modules", __path__=[])
    stub("modules.shared", opts=types.SimpleNamespace(data={}), cmd_opts=types.SimpleNamespace())
    stub("modules.devices", get_device_for=lambda _: "cpu", device="cpu")
    stub("modules.safe", unsafe_torch_load=None, Extra=None)
    stub("modules.modelloader", load_file_from_url=None)
    from scripts.supported_preprocessor import Preprocessor

    # The package's __init__ imports every preprocessor (pulid needs facexlib): these only.
    stub("scripts.preprocessor", __path__=[os.path.join(ext, "scripts", "preprocessor")])
    import scripts.preprocessor.inpaint  # noqa: F401
    import scripts.preprocessor.lama_inpaint  # noqa: F401
    import scripts.preprocessor.legacy.legacy_preprocessors  # noqa: F401
    import scripts.preprocessor.model_free_preprocessors  # noqa: F401
    import scripts.preprocessor.teed  # noqa: F401
    from internal_controlnet.args import ControlNetUnit

    # external_code.py's hooks.
    ControlNetUnit.cls_match_model = lambda model: True
    ControlNetUnit.cls_match_module = lambda m: Preprocessor.get_preprocessor(m) is not None
    ControlNetUnit.cls_get_preprocessor = Preprocessor.get_preprocessor
    return ControlNetUnit, Preprocessor


def cases(Preprocessor):
    """API units: every module with its defaults (-1 and absent), in-range values (ints and
    floats where the unit keeps floats), out-of-range ones; the general fields' forms."""
    out = []
    for name in MODULES:
        p = Preprocessor.get_preprocessor(name)
        assert p is not None, name
        base = {"enabled": True, "module": name, "model": "control_a"}
        out.append(dict(base))
        out.append(dict(base, processor_res=-1, threshold_a=-1, threshold_b=-1))
        mid = lambda s: s.minimum + (s.maximum - s.minimum) * 0.37  # noqa: E731
        out.append(dict(base, processor_res=mid(p.slider_resolution),
                        threshold_a=mid(p.slider_1), threshold_b=int(mid(p.slider_2))))
        out.append(dict(base, processor_res=100000, threshold_a=1e6, threshold_b=-7.5))
    general = {"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]"}
    out += [
        dict(general, weight=1, guidance_start=0, guidance_end=1),
        dict(general, weight=0.35, guidance_start=0.1, guidance=0.65),
        dict(general, weight=1.25, resize_mode="Just Resize", pixel_perfect=True),
        dict(general, resize_mode="Resize and Fill", control_mode="My prompt is more important"),
        dict(general, resize_mode="Inner Fit (Scale to Fit)", control_mode="ControlNet is more important"),
        dict(general, resize_mode="Envelope (Outer Fit)", weight=2.0, guidance_start=0.0001),
        dict(general, module="softedge_hed", weight=0.00001),
        {"enabled": True, "module": "reference_only", "threshold_a": 0.25},
        {"enabled": True, "module": "inpaint_global_harmonious", "model": "control_v11p_sd15_inpaint"},
        # A model name with `,` or `:`: serialize logs "Unexpected tokens" and returns "".
        dict(general, model="canny, v2 [d14c016b]"),
        dict(general, model="sd15:canny"),
    ]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extension", default=os.environ.get("SD_WEBUI_CONTROLNET_DIR"))
    ap.add_argument("--check", help="a file of entries, one a line, to parse")
    args = ap.parse_args()
    if not args.extension:
        print("no sd-webui-controlnet checkout (--extension or $SD_WEBUI_CONTROLNET_DIR): nothing written")
        return
    ControlNetUnit, Preprocessor = load(args.extension)
    fields = ControlNetUnit.infotext_fields()

    def parsed(entry):
        unit = ControlNetUnit.parse(entry)
        return {f: str(getattr(unit, f).value if hasattr(getattr(unit, f), "value") else getattr(unit, f)) for f in fields}

    if args.check:
        with open(args.check, encoding="utf-8") as f:
            entries = [line.rstrip("\n") for line in f if line.strip()]
        for entry in entries:
            parsed(entry)  # raises on an entry the extension's parser refuses
        print(f"{len(entries)} entries parsed by the extension's ControlNetUnit.parse")
        return
    rows = []
    for unit in cases(Preprocessor):
        entry = ControlNetUnit.from_dict(unit).serialize()
        assert entry or any(c in unit.get("model", "") for c in ",:"), unit
        rows.append({"unit": unit, "infotext": entry, "parsed": parsed(entry) if entry else None})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(rows)} units")


if __name__ == "__main__":
    main()
