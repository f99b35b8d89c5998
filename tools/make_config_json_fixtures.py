#!/usr/bin/env python3
"""Config files as diffusers writes them, and what Python's `json` reads back from them (diffusers
0.42.1). `save_config` writes `json.dumps`, which puts non-finite floats as bare `-Infinity`,
`Infinity` and `NaN` (DPMSolverMultistepScheduler's default `lambda_min_clipped` is -inf), so
such files are common on the hub. Runs after tools/make_tiny_models.py (reads tiny-a/).

Writes crates/pipeline/tests/fixtures/config-json/:
  <Class>.json     Class.from_config(tiny-a's scheduler config).save_config(...), as written
  dpm-clipped.json the same for DPMSolverMultistepScheduler with a finite lambda_min_clipped
  strings.json     json.dump of a config whose strings spell the three tokens, beside real ones
  expected.json    {file: {"loaded": json.load(file) tagged by Python type, "timesteps":
                   set_timesteps(STEPS) of the class the file names (scheduler files only)}}

A tagged value is {"null": None} | {"bool": b} | {"int": i} | {"float": x or repr(x) when not
finite: "inf", "-inf", "nan"} | {"str": s} | {"list": [...]} | {"dict": [[key, value], ...]}, so
an int stays apart from a float and a non-finite float from a string, in strict JSON.

Run from the repository root: python3 tools/make_config_json_fixtures.py
"""
import json
import math
import os

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

FIXTURES = os.path.join("crates", "pipeline", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "config-json")
SOURCE = os.path.join(FIXTURES, "tiny-a", "scheduler", "scheduler_config.json")
STEPS = 12

CLASSES = [
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
]

# A config whose strings spell the tokens: they must stay text, keys included.
STRINGS = {
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "leading",
    "note": "Infinity, -Infinity and NaN stay text",
    "quoted": 'say "-Infinity", then \\NaN',
    "Infinity": "a key",
    "lambda_min_clipped": float("-inf"),
    "nested": {"values": [float("nan"), float("inf"), -0.0, 1.0, 1, "NaN", None, True]},
    "big": 1e308 * 10,
}


def tag(v):
    if v is None:
        return {"null": None}
    if isinstance(v, bool):
        return {"bool": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v if math.isfinite(v) else repr(v)}
    if isinstance(v, str):
        return {"str": v}
    if isinstance(v, list):
        return {"list": [tag(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[k, tag(x)] for k, x in v.items()]}
    raise TypeError(type(v))


def save(cls, path, **overrides):
    """Writes what `save_config` writes (its file name is fixed, so through `to_json_string`)."""
    sched = cls.from_config(cls.load_config(SOURCE), **overrides)
    with open(path, "w", encoding="utf-8") as f:
        f.write(sched.to_json_string())
    return sched


def main():
    assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
    assert diffusers.__version__ == "0.42.1", diffusers.__version__
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    files = [(cls, f"{cls.__name__}.json", {}) for cls in CLASSES]
    files.append((DPMSolverMultistepScheduler, "dpm-clipped.json", {"lambda_min_clipped": -2.5}))
    for cls, name, overrides in files:
        path = os.path.join(OUT, name)
        sched = save(cls, path, **overrides)
        # What from_config reads back from the file is what we must read.
        again = cls.from_config(cls.load_config(path))
        again.set_timesteps(STEPS)
        sched.set_timesteps(STEPS)
        assert torch.equal(again.timesteps, sched.timesteps), name
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        expected[name] = {
            "loaded": tag(loaded),
            "timesteps": [float(t) for t in again.timesteps],
        }
    path = os.path.join(OUT, "strings.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(STRINGS, f, indent=2)
        f.write("\n")
    with open(path, encoding="utf-8") as f:
        expected["strings.json"] = {"loaded": tag(json.load(f))}
    assert "-Infinity" in open(os.path.join(OUT, "DPMSolverMultistepScheduler.json")).read()
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "generated_by": "tools/make_config_json_fixtures.py",
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "source": "tiny-a/scheduler/scheduler_config.json",
                "steps": STEPS,
                "files": expected,
            },
            f,
            indent=1,
            allow_nan=False,
        )
        f.write("\n")


if __name__ == "__main__":
    main()
