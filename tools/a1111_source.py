"""A1111's own functions, taken from a checkout's source with `ast` and run as they are (not
copied into ours). Shared by the A1111 reference scripts (make_esrgan_fixtures.py,
make_extras_fixtures.py, make_inpaint_a1111_fixtures.py, make_swinir_fixtures.py,
make_upscale_hires_fixtures.py, make_a1111_mask_alpha_fixtures.py, a1111_steps.py)."""

import argparse
import ast
import hashlib
import os


def functions(path, wanted, namespace):
    """Executes the named functions (`Class.method` or `function`) or classes (`Class`) of a
    file in `namespace` (decorators dropped); returns their objects and the sha256 of each one's source, by name.
    Each is bound in `namespace` by its bare name: take a function before another of the same
    bare name shadows it."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    out, digests = {}, {}
    for name in wanted:
        cls, _, fn = name.rpartition(".")
        body = tree.body
        if cls:
            (c,) = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls]
            body = c.body
        kinds = (ast.FunctionDef, ast.ClassDef)
        (node,) = [n for n in body if isinstance(n, kinds) and n.name == fn]
        node.decorator_list = []
        exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
        out[name] = namespace[fn]
        digests[name] = hashlib.sha256(ast.get_source_segment(source, node).encode()).hexdigest()
    return out, digests


def a1111_args(script, doc, default_out):
    """The command line of an A1111 reference script: `--a1111` (a checkout; default
    $A1111_DIR) and `--out` (default `default_out`). None, after saying so, without a checkout:
    tools/make_fixtures.sh runs every script, and the committed fixtures then stay as they are."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"),
                    help="a checkout of stable-diffusion-webui (default: $A1111_DIR)")
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    if not args.a1111:
        print(f"{os.path.basename(script)}: skipped (needs --a1111 or A1111_DIR)")
        return None
    return args
