#!/usr/bin/env python
"""Regenerate processor/tests/fixtures/pillow_draw/: Pillow ImageDraw references for the
hard-edged primitives of processor/src/visual_prompt/pillow/ (tested in
processor/tests/visual_prompt.rs, `pillow_*`).

Needs only Pillow (any venv):

    python3 -m venv /tmp/venv-pil && /tmp/venv-pil/bin/pip install pillow
    /tmp/venv-pil/bin/python scripts/make_draw_fixtures.py

Every case is one ImageDraw call on its own transparent RGBA canvas
(Image.new("RGBA", size, (0, 0, 0, 0)), ImageDraw.Draw(canvas), no blending), as ViP-LLaVA's
training code draws its marks (llava/visual_prompt_generator.py, image_blending). The calls
are the ones the training code makes: rectangle(outline, width), ellipse(outline, width),
filled ellipse (points), line(width) with and without joint="curve" (triangles, scribbles,
arrow shafts and open heads), filled polygon (masks, arrow heads), the 1-px polygon outline
(mask contours), and the filled pieslice that joint="curve" uses at joins. Canvases 40x30,
64x64 and 71x23; integer and fractional coordinates, widths 1, 2, 3, 5, 8, 12, shapes partly
or wholly outside the canvas.

What it writes:

- <op>.png, one per primitive: the case canvases stacked top to bottom (left-aligned, the
  atlas as wide as the widest canvas; pixels right of a narrower canvas stay transparent).
- manifest.json: {"cases": [{"op", "name", "size": [w, h], "top": row in the atlas, "ink":
  [r, g, b, a], and the call's arguments}]}. Floats are written with repr(), so they read back
  exactly.

`--out DIR --random N` writes a larger randomized set elsewhere (for local checks:
PILLOW_DRAW_FIXTURES=DIR cargo test -p vipllava-processor --test visual_prompt pillow).
"""

from __future__ import annotations

import argparse
import json
import random

from PIL import Image, ImageDraw

import common

OUT = common.REPO_ROOT / "processor" / "tests" / "fixtures" / "pillow_draw"
SIZES = [(40, 30), (64, 64), (71, 23)]
WIDTHS = [1, 2, 3, 5, 8, 12]
INKS = [(255, 0, 0, 128), (0, 255, 0, 255), (12, 34, 56, 96)]
OPS = [
    "rectangle",
    "rectangle_filled",
    "ellipse",
    "ellipse_filled",
    "line",
    "polygon_filled",
    "polygon_outline",
    "pieslice_filled",
]


def draw_case(case: dict) -> Image.Image:
    canvas = Image.new("RGBA", tuple(case["size"]), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    ink = tuple(case["ink"])
    op = case["op"]
    if op == "rectangle":
        d.rectangle(case["box"], outline=ink, width=case["width"])
    elif op == "rectangle_filled":
        d.rectangle(case["box"], fill=ink)
    elif op == "ellipse":
        d.ellipse(case["box"], outline=ink, width=case["width"])
    elif op == "ellipse_filled":
        # the training code's points: outline and fill the same colour
        d.ellipse(case["box"], outline=ink, fill=ink)
    elif op == "line":
        pts = [tuple(p) for p in case["points"]]
        d.line(pts, fill=ink, width=case["width"], joint=case["joint"])
    elif op == "polygon_filled":
        d.polygon([tuple(p) for p in case["points"]], fill=ink)
    elif op == "polygon_outline":
        d.polygon([tuple(p) for p in case["points"]], outline=ink)
    elif op == "pieslice_filled":
        d.pieslice(case["box"], case["start"], case["end"], fill=ink)
    else:
        raise ValueError(op)
    return canvas


def coord(rng: random.Random, lo: float, hi: float, frac: bool) -> float:
    v = rng.uniform(lo, hi)
    return v if frac else float(round(v))


def rand_box(rng, w, h, frac, min_side=0.0):
    x0 = coord(rng, -12, w - 2, frac)
    y0 = coord(rng, -12, h - 2, frac)
    x1 = x0 + coord(rng, min_side, w * 0.9 + 6, frac)
    y1 = y0 + coord(rng, min_side, h * 0.9 + 6, frac)
    return [x0, y0, x1, y1]


def rand_points(rng, w, h, n, frac):
    return [[coord(rng, -10, w + 10, frac), coord(rng, -10, h + 10, frac)] for _ in range(n)]


def bezier(p0, p1, p2, p3, n):
    """A scribble as the training code draws it: a cubic Bezier sampled at n points."""
    pts = []
    for i in range(n):
        t = i / (n - 1)
        pts.append([
            (1 - t) ** 3 * p0[k] + 3 * (1 - t) ** 2 * t * p1[k] + 3 * (1 - t) * t**2 * p2[k] + t**3 * p3[k]
            for k in range(2)
        ])
    return pts


def fixed_cases() -> list[dict]:
    """Hand-picked cases: the common mark geometries and the degenerate ones."""
    c = []
    for wd in WIDTHS:
        c.append(dict(op="rectangle", size=[40, 30], box=[5, 4, 30, 22], width=wd))
        c.append(dict(op="ellipse", size=[64, 64], box=[6, 8, 55, 50], width=wd))
        c.append(dict(op="line", size=[64, 64], points=[[8, 10], [50, 20], [20, 55], [8, 10]], width=wd, joint="curve"))
        c.append(dict(op="line", size=[71, 23], points=[[3.5, 20.25], [67.75, 2.5]], width=wd, joint=None))
    c += [
        dict(op="rectangle", size=[40, 30], box=[-5, -5, 50, 40], width=3),
        dict(op="rectangle", size=[40, 30], box=[10, 10, 10, 10], width=1),
        dict(op="rectangle", size=[40, 30], box=[10, 10, 14, 12], width=5),
        dict(op="rectangle_filled", size=[40, 30], box=[-3.7, 2.2, 12.9, 40.0]),
        dict(op="ellipse", size=[40, 30], box=[10, 10, 10, 10], width=1),
        dict(op="ellipse", size=[40, 30], box=[-20, -8, 20, 25], width=4),
        dict(op="ellipse_filled", size=[40, 30], box=[10, 10, 10, 10]),
        dict(op="ellipse_filled", size=[40, 30], box=[10, 10, 11, 12]),
        dict(op="ellipse_filled", size=[64, 64], box=[20.6, 20.6, 43.4, 43.4]),
        dict(op="line", size=[40, 30], points=[[5, 5], [5, 5]], width=5, joint=None),
        dict(op="line", size=[40, 30], points=[[5, 5], [30, 5], [30, 25]], width=1, joint=None),
        dict(op="line", size=[40, 30], points=[[5, 5], [20, 15], [35, 25]], width=9, joint="curve"),
        dict(op="polygon_filled", size=[40, 30], points=[[5, 5], [30, 5], [30, 25], [5, 25]]),
        dict(op="polygon_filled", size=[40, 30], points=[[20, 2], [35, 27], [5, 27]]),
        dict(op="polygon_filled", size=[40, 30], points=[[5, 5], [10, 5], [15, 5], [15, 15], [5, 15]]),
        dict(op="polygon_outline", size=[40, 30], points=[[20, 2], [35, 27], [5, 27]]),
        dict(op="line", size=[64, 64], points=bezier([3.3, 60.1], [80.2, -20.7], [-15.4, 30.9], [58.6, 6.2], 300), width=7, joint=None),
        dict(op="line", size=[64, 64], points=bezier([10.5, 50.5], [70.0, 70.0], [-5.0, 5.0], [50.5, 10.5], 40), width=12, joint="curve"),
        dict(op="pieslice_filled", size=[40, 30], box=[5, 5, 30, 25], start=30.0, end=100.0),
        dict(op="pieslice_filled", size=[40, 30], box=[5, 5, 30, 25], start=-200.0, end=45.5),
    ]
    return c


def random_cases(rng: random.Random, per_op: int, sizes, widths) -> list[dict]:
    c = []
    for op in OPS:
        for i in range(per_op):
            w, h = sizes[i % len(sizes)]
            frac = i % 2 == 1
            wd = widths[(i // 2) % len(widths)]
            case = dict(op=op, size=[w, h])
            if op in ("rectangle", "ellipse"):
                case.update(box=rand_box(rng, w, h, frac), width=wd)
            elif op in ("rectangle_filled", "ellipse_filled"):
                case.update(box=rand_box(rng, w, h, frac))
            elif op == "line":
                n = rng.choice([2, 3, 4, 6])
                case.update(points=rand_points(rng, w, h, n, frac), width=wd, joint=rng.choice([None, "curve"]))
            elif op in ("polygon_filled", "polygon_outline"):
                n = rng.choice([3, 3, 4, 5, 8])
                case.update(points=rand_points(rng, w, h, n, frac))
            elif op == "pieslice_filled":
                case.update(box=rand_box(rng, w, h, frac, 2.0), start=rng.uniform(-360, 360), end=rng.uniform(-360, 360))
            c.append(case)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--random", type=int, default=24, help="random cases per primitive")
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for w, h in SIZES), help="WxH,... of the random cases")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="stroke widths of the random cases")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    widths = [int(v) for v in args.widths.split(",")]

    rng = random.Random(args.seed)
    cases = fixed_cases() + random_cases(rng, args.random, sizes, widths)
    counts: dict[str, int] = {}
    for i, case in enumerate(cases):
        counts[case["op"]] = counts.get(case["op"], 0) + 1
        case["name"] = f"{case['op']}_{counts[case['op']]:03d}"
        case["ink"] = list(INKS[i % len(INKS)])

    out = common.fresh_dir(args.out)
    for op in OPS:
        mine = [c for c in cases if c["op"] == op]
        images = [draw_case(c) for c in mine]
        atlas = Image.new("RGBA", (max(im.width for im in images), sum(im.height for im in images)), (0, 0, 0, 0))
        top = 0
        for case, im in zip(mine, images):
            case["top"] = top
            atlas.paste(im, (0, top))
            top += im.height
        atlas.save(out / f"{op}.png", optimize=True)
    # one case a line: small, and diffs stay readable
    lines = ",\n".join(json.dumps(c) for c in cases)
    (out / "manifest.json").write_text('{"cases": [\n' + lines + "\n]}\n")
    common.log(f"{len(cases)} cases -> {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
