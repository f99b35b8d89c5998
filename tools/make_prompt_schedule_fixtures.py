#!/usr/bin/env python3
"""Reference prompt schedules and AND splits for A1111's prompt editing (`[from:to:when]`),
alternation (`[a|b]`) and composable diffusion (`a AND b :1.2`): A1111's own
`modules/prompt_parser.py` (its lark grammar `schedule_parser`,
`get_learned_conditioning_prompt_schedules`, `re_AND`, `re_weight`, `get_multicond_prompt_list`),
taken from a checkout of AUTOMATIC1111/stable-diffusion-webui with `ast` (the source is executed,
not copied here) and run on the prompts below and on seeded random ones. Default options:
`use_old_scheduling` False (A1111 1.6+). Pinned: lark (tools/requirements.txt).

Writes crates/pipeline/tests/fixtures/prompt_schedules.json:
  schedules: [{prompt, steps, hires_steps (null: a first pass), schedule: [[end_at_step, text]]}]
  and_parts: [{prompt, parts: [[text, weight]]}]   (one prompt's get_multicond_prompt_list)
  plans: [{prompt, negative_prompt, steps, parts: [{weight, schedule}], negative_schedule}]
         whole requests' conditioning plans, for tools/make_prompt_schedule_images.py

Usage:
  python tools/make_prompt_schedule_fixtures.py --a1111 PATH/TO/stable-diffusion-webui [--out DIR]
"""

import ast
import hashlib
import json
import os
import random
import sys

import lark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from a1111_source import a1111_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "crates", "pipeline", "tests", "fixtures")

# What people write, and the corners of the grammar: nesting, escapes, `when` as a fraction
# (with a ".") and as a step (without), numbers past the steps, signs and exponents, empty
# sides, whitespace around the number, alternation with empty options, AND with weights,
# `(x:1.2)` emphasis inside and around, BREAK, and prompts the grammar refuses (a `|` outside
# brackets, a trailing backslash): those stay as written.
PROMPTS = [
    "a photo of a cat",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]",
    "a [b:3]",
    "a [b: 3]",
    "a [b:3 ]",
    "a [[[b]]:2]",
    "[(a:2):3]",
    "a [b : c : 1] d",
    "a[b:[c:d:2]:1]e",
    "a [unbalanced",
    "a [b:.5] c",
    "a [b:0.5] c",
    "a [b:1.0] c",
    "a [b:1.5] c",
    "a [b:15] c",
    "a [b:0] c",
    "a [b:-2] c",
    "a [b:+3] c",
    "a [b:1e1] c",
    "a [b:2.5e-1] c",
    "a [b:5.] c",
    "a [{b|d{:.5] c",
    "((a][:b:c [d:3]",
    "[a|(b:1.1)]",
    "[fe|]male",
    "[fe|||]male",
    "[cat|dog|bird] in a field",
    "a [cat|dog] and a [red|green|blue] ball",
    "a (red:1.3) [cat:dog:0.4], (masterpiece), [[blurry]]",
    "a [(cat:1.2):(dog:0.8):6] on a sofa",
    "a [cat:[dog|fox]:0.5]",
    "[a:[b:c:0.8]:0.2]",
    "an escaped \\[not:scheduled:3\\] bracket",
    "an escaped \\(paren\\) and [x:y:2]",
    "a | pipe outside",
    "a trailing backslash \\",
    "a [b:c:d:3] e",
    "a [b:c] e",
    "a (b:c) [d:e:2]",
    "(a [b:c:2] d)",
    "(a [b:c:2] d:1.4)",
    "[a [b:c:2]]",
    "a cat BREAK a [dog:fox:0.5]",
    "a [dog:fox:0.5] BREAK a cat",
    "a [ cat : dog : 0.5 ] here",
    "a [:dog:0.3] here",
    "a [cat::0.3] here",
    "[|]",
    "[]",
    "a ) b ] c [d:2]",
    "a (b) [c] (d:1.5) [e:f:0.5]",
    "the [quick|slow] [brown:red:4] fox:1.2",
    "lighthouse, [day:night:0.5], [calm|stormy] sea, (dramatic clouds:1.2)",
]

AND_PROMPTS = [
    "a cat",
    "a cat AND a dog",
    "a cat :1.2 AND a dog",
    "a cat:1.2 AND a dog :0.8",
    "a cat AND a dog: -0.5",
    "a cat AND a dog :.5",
    "a cat AND a dog :2.",
    "a photo:1.5",
    "(a cat:1.2)",
    "a cat ANDa dog",
    "a cat AND AND a dog",
    "AND",
    "a cat AND",
    " a cat  AND  a dog  ",
    "a [cat:dog:0.5] AND a [red|blue] ball :0.7",
    "a cat AND a cat",
    "a cat :1.2:1.3",
    "a cat :1.2 x",
    "ANDROID AND band",
    "a cat\nAND\na dog :0.6\n",
]

# Whole requests for tools/make_prompt_schedule_images.py: (prompt, negative prompt, steps as A1111
# counts them: the steps times 2 for a second-order sampler). Their plans are written out in
# full (AND parts, then each part's and the negative prompt's schedule), as A1111's
# get_multicond_learned_conditioning and get_learned_conditioning make them.
PLANS = [
    ("a photo of [an astronaut:a diver:0.4] riding a horse on mars", "blurry, low quality", 10),
    ("a [photo of an astronaut riding a horse|watercolor painting of a castle at night] on mars",
     "blurry, [low quality:ugly:3]", 10),
    ("a photo of an astronaut riding a horse AND on mars :0.7", "blurry, low quality", 10),
    ("[an astronaut:a diver:0.5] riding a horse :1.2 AND red planet", "blurry, low quality", 10),
    ("a watercolor painting of a [lighthouse:castle:0.5] at sunset", "", 10),
    ("a watercolor painting of a lighthouse AND a [red|golden] sunset :0.6", "", 10),
]

# Random prompts over the grammar's characters (seeded): every branch of the parser, and the
# places where it gives up.
ALPHABET = ["a", "b", " ", "[", "]", "(", ")", ":", "|", "1", "2", ".5", "0.3", "\\", "\\[", " AND ", "x y",
            "[a:", ":2]", ":0.5]", "[b|", "|c]", "(d:1.2)", "[e:f:3]", "[g|h]"]


def random_prompts(n, seed=1234):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 14)
        out.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return out


def a1111_prompt_parser(checkout):
    path = os.path.join(checkout, "modules", "prompt_parser.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    wanted_fns = {"get_learned_conditioning_prompt_schedules", "get_multicond_prompt_list"}
    wanted_vars = {"schedule_parser", "re_AND", "re_weight"}
    nodes = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            nodes.append(node)
        elif isinstance(node, ast.FunctionDef) and node.name in wanted_fns:
            nodes.append(node)
        elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in wanted_vars for t in node.targets):
            nodes.append(node)
    assert len(nodes) == 6, f"expected the future import, 3 assignments and 2 functions, got {len(nodes)}"
    digest = hashlib.sha256()
    for node in nodes:
        digest.update(ast.get_source_segment(source, node).encode())
    import re
    # `SdConditioning` only carries SDXL's sizes along; a list does the rest.
    namespace = {"lark": lark, "re": re, "SdConditioning": list}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)
    return namespace, digest.hexdigest()


def main():
    args = a1111_args(__file__, __doc__, DEFAULT_OUT)
    if args is None:
        return
    ns, digest = a1111_prompt_parser(args.a1111)
    schedules_of = ns["get_learned_conditioning_prompt_schedules"]
    schedules = []
    # (base steps, hires steps): first passes of several lengths (second-order samplers count
    # twice the steps), and hires passes that go on from a first pass.
    step_cases = [(10, None), (20, None), (7, None), (10, 6), (40, 20)]
    for prompt in PROMPTS:
        for steps, hires in step_cases:
            s = schedules_of([prompt], steps, hires)[0]
            schedules.append(dict(prompt=prompt, steps=steps, hires_steps=hires,
                                  schedule=[[int(t), text] for t, text in s]))
    for prompt in random_prompts(400):
        for steps, hires in [(9, None), (9, 4)]:
            s = schedules_of([prompt], steps, hires)[0]
            schedules.append(dict(prompt=prompt, steps=steps, hires_steps=hires,
                                  schedule=[[int(t), text] for t, text in s]))
    and_parts = []
    for prompt in AND_PROMPTS + random_prompts(100, seed=99):
        indexes, flat, _ = ns["get_multicond_prompt_list"]([prompt])
        and_parts.append(dict(prompt=prompt, parts=[[flat[i], w] for i, w in indexes[0]]))
    plans = []
    for prompt, negative, steps in PLANS:
        indexes, flat, _ = ns["get_multicond_prompt_list"]([prompt])
        parts = []
        for i, weight in indexes[0]:
            s = schedules_of([flat[i]], steps)[0]
            parts.append(dict(weight=weight, schedule=[[int(t), text] for t, text in s]))
        neg = schedules_of([negative], steps)[0]
        plans.append(dict(prompt=prompt, negative_prompt=negative, steps=steps, parts=parts,
                          negative_schedule=[[int(t), text] for t, text in neg]))
    meta = {
        "generated_by": "tools/make_prompt_schedule_fixtures.py",
        "versions": {"lark": lark.__version__},
        "source": "modules/prompt_parser.py (schedule_parser, get_learned_conditioning_prompt_schedules, "
                  f"re_AND, re_weight, get_multicond_prompt_list), source sha256 {digest}",
        "schedules": schedules,
        "and_parts": and_parts,
        "plans": plans,
    }
    with open(os.path.join(args.out, "prompt_schedules.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=0, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
