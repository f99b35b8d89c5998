#!/usr/bin/env python3
"""What AUTOMATIC1111's own `modules/styles.py` makes of the styles files in
crates/server/tests/fixtures/styles: the styles it loads from each (`StyleDatabase`) and the
prompt and negative prompt it runs for a list of requests (`apply_styles_to_prompt`,
`apply_negative_styles_to_prompt`, as `processing.setup_prompts` calls them). The server's
styles module is tested against the JSON this writes.

A1111's code is not in this repository: pass a checkout (tested with v1.10.1), e.g.
  git clone --depth 1 -b v1.10.1 https://github.com/AUTOMATIC1111/stable-diffusion-webui /tmp/a1111
  python tools/make_styles_fixtures.py --a1111 /tmp/a1111     (or A1111_DIR=/tmp/a1111)
Only modules/styles.py is imported (its one import of A1111, `modules.errors`, is stubbed to
raise, so a file A1111 fails to read fails here).
"""

import argparse
import importlib.util
import json
import os
import sys
import types

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "crates", "server", "tests", "fixtures", "styles")

# (file, prompt, negative prompt, styles): each style list in request order.
CASES = [
    ("styles.csv", "a cat", "", ["Cinematic"]),
    ("styles.csv", "a cat", "blurry", ["Appended", "Cinematic"]),
    ("styles.csv", "a cat", "blurry", ["Cinematic", "Appended"]),
    ("styles.csv", "", "", ["Appended"]),
    ("styles.csv", "  a cat  ", "  blurry ", ["Appended"]),
    ("styles.csv", "a cat", "x", ["Twice"]),
    ("styles.csv", "a cat", "", ["Wrapped"]),
    ("styles.csv", "a cat", "", ["Quotes"]),
    ("styles.csv", "a (cat:1.2)", "", ["Lora"]),
    ("styles.csv", "a cat", "dark", ["Empty"]),
    ("styles.csv", "a cat", "dark", ["Padded"]),
    ("styles.csv", "a cat", "dark", ["Spaced"]),
    ("styles.csv", "a cat", "dark", ["Extra"]),
    ("styles.csv", "a cat", "dark", ["Nested", "Nested"]),
    ("styles.csv", "a {prompt} cat", "", ["Cinematic"]),
    ("styles.csv", "a cat", "", []),
    ("styles-old.csv", "a cat", "", ["Old"]),
]


def load_styles_module(a1111):
    errors = types.ModuleType("modules.errors")

    def report(message, exc_info=False):
        raise RuntimeError(message)

    errors.report = report
    modules = types.ModuleType("modules")
    modules.errors = errors
    sys.modules["modules"] = modules
    sys.modules["modules.errors"] = errors
    path = os.path.join(a1111, "modules", "styles.py")
    spec = importlib.util.spec_from_file_location("a1111_styles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"),
                    help="a checkout of AUTOMATIC1111/stable-diffusion-webui (default: $A1111_DIR)")
    args = ap.parse_args()
    if not args.a1111:
        # tools/make_fixtures.sh runs every script: without A1111's source the committed
        # fixture stays as it is.
        print("make_styles_fixtures.py: skipped (needs --a1111 or A1111_DIR)")
        return
    styles = load_styles_module(args.a1111)

    files = {}
    dbs = {}
    for name in sorted({c[0] for c in CASES}):
        db = styles.StyleDatabase([os.path.join(FIXTURES, name)])
        dbs[name] = db
        files[name] = [
            {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in db.styles.values()
        ]
    cases = []
    for file, prompt, negative, names in CASES:
        db = dbs[file]
        cases.append({
            "file": file,
            "prompt": prompt,
            "negative_prompt": negative,
            "styles": names,
            "want_prompt": db.apply_styles_to_prompt(prompt, names),
            "want_negative_prompt": db.apply_negative_styles_to_prompt(negative, names),
        })
    out = os.path.join(FIXTURES, "styles.json")
    with open(out, "w") as f:
        json.dump({"files": files, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out}: {sum(len(v) for v in files.values())} styles, {len(cases)} cases")


if __name__ == "__main__":
    main()
