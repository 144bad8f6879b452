#!/usr/bin/env python
"""Regenerate processor/tests/fixtures/pillow_draw/: Pillow ImageDraw references for the
hard-edged primitives of processor/src/visual_prompt/pillow/ (tested in
processor/tests/processor/visual_prompt.rs, `pillow_*`).

Needs Pillow and numpy (any venv; Pillow 13.0.0 made the committed set):

    python3 -m venv /tmp/venv-pil && /tmp/venv-pil/bin/pip install pillow numpy
    /tmp/venv-pil/bin/python scripts/make_draw_fixtures.py

Every case is one ImageDraw call on its own transparent RGBA canvas
(Image.new("RGBA", size, (0, 0, 0, 0)), ImageDraw.Draw(canvas), no blending), as ViP-LLaVA's
training code draws its marks (llava/visual_prompt_generator.py, image_blending). The calls
are the ones the training code makes: rectangle(outline, width), ellipse(outline, width),
filled ellipse (points), line(width) with and without joint="curve" (triangles, scribbles,
arrow shafts and open heads), filled polygon (masks, arrow heads), the 1-px polygon outline
(mask contours), and the filled pieslice that joint="curve" uses at joins. The mark_* cases
make the whole call sequence of one training mark on given geometry (the training code's random
draws are the case's inputs): the scaled ellipse, the triangle, the point, the Bezier scribble
at numpy.linspace samples, the arrow (straight or wobbly shaft, filled or open head), the mask
contour stamped at every offset. The composite cases alpha-composite a triangle layer onto an
RGB image as image_blending does (Image.alpha_composite, then RGB). Canvases 40x30,
64x64 and 71x23; integer and fractional coordinates, widths 1, 2, 3, 5, 8, 12, shapes partly
or wholly outside the canvas.

What it writes:

- <op>.png, one per primitive: the case canvases stacked top to bottom (left-aligned, the
  atlas as wide as the widest canvas; pixels right of a narrower canvas stay transparent).
- manifest.json: {"cases": [{"op", "name", "size": [w, h], "top": row in the atlas, "ink":
  [r, g, b, a], and the call's arguments}]}. Floats are written with repr(), so they read back
  exactly.

`--out DIR --random N` writes a larger randomized set elsewhere (for local checks:
PILLOW_DRAW_FIXTURES=DIR cargo test -p vipllava-processor --test processor visual_prompt::pillow).
"""

from __future__ import annotations

import argparse
import json
import math
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
    "mark_ellipse",
    "mark_triangle",
    "mark_point",
    "mark_scribble",
    "mark_arrow",
    "mark_contour",
    "composite",
]


def backdrop(w: int, h: int) -> Image.Image:
    """The RGB image the `composite` cases blend onto (the Rust test builds the same one)."""
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 7 + y * 3) % 256, (x * 5 + y * 11) % 256, (x * 13 + y * 17) % 256) for y in range(h) for x in range(w)])
    return im


def draw_case(case: dict) -> Image.Image:
    canvas = Image.new("RGBA", tuple(case["size"]), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    ink = tuple(case["ink"])
    op = case["op"]
    if op == "composite":
        # image_blending: a triangle layer alpha-composited onto the RGB image, back to RGB
        p = [tuple(q) for q in case["points"]]
        d.line([p[0], p[1], p[2], p[0]], fill=ink, width=case["width"], joint="curve")
        out = Image.alpha_composite(backdrop(*case["size"]).convert("RGBA"), canvas).convert("RGB")
        return out.convert("RGBA")
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
    elif op.startswith("mark_"):
        draw_mark(d, case, ink)
    else:
        raise ValueError(op)
    return canvas


def draw_mark(d: ImageDraw.ImageDraw, case: dict, ink) -> None:
    """The ImageDraw calls the training code (llava/visual_prompt_generator.py) makes for one
    mark, on the geometry given in the case (its random draws are the case's inputs)."""
    op = case["op"]
    if op == "mark_ellipse":  # draw_ellipse: the box scaled about its centre
        minx, miny, maxx, maxy = case["box"]
        cx, cy = (maxx + minx) / 2, (maxy + miny) / 2
        nw = (maxx - minx) * case["size_ratio"] * case["aspect_ratio"]
        nh = (maxy - miny) * case["size_ratio"] / case["aspect_ratio"]
        d.ellipse([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], outline=ink, width=case["width"])
    elif op == "mark_triangle":  # draw_triangle
        p = [tuple(q) for q in case["points"]]
        d.line([p[0], p[1], p[2], p[0]], fill=ink, width=case["width"], joint="curve")
    elif op == "mark_point":  # draw_point
        (cx, cy), r, ar = case["centre"], case["radius"], case["aspect_ratio"]
        rx, ry = r * ar, r / ar
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=ink, fill=ink)
    elif op == "mark_scribble":  # draw_scribble: Bezier at numpy.linspace, one line per step
        import numpy as np

        p0, p1, p2, p3 = case["control"]
        prev = None
        for t in np.linspace(0, 1, case["n"]):
            cur = tuple(
                (1 - t) ** 3 * p0[k] + 3 * (1 - t) ** 2 * t * p1[k] + 3 * (1 - t) * t**2 * p2[k] + t**3 * p3[k]
                for k in range(2)
            )
            if prev:
                d.line([prev, cur], fill=ink, width=case["width"])
            prev = cur
    elif op == "mark_arrow":  # draw_arrow with its random draws given
        cx, cy = case["tip"]
        a, L, H = case["angle"], case["length"], case["head"]
        ex, ey = cx + (L - H) * math.cos(a), cy + (L - H) * math.sin(a)
        if case["wobble"] is not None:
            mx = (cx + ex) / 2 + case["wobble"][0]
            my = (cy + ey) / 2 + case["wobble"][1]
            d.line([(cx, cy), (mx, my), (ex, ey)], fill=ink, width=case["width"])
        else:
            d.line([(cx, cy), (ex, ey)], fill=ink, width=case["width"])
        head = [
            (cx + H * math.cos(a + math.pi / 3), cy + H * math.sin(a + math.pi / 3)),
            (cx, cy),
            (cx + H * math.cos(a - math.pi / 3), cy + H * math.sin(a - math.pi / 3)),
        ]
        if case["head_kind"] == "filled":
            d.polygon(head, fill=ink)
        else:
            d.line(head, fill=ink, width=case["width"])
    elif op == "mark_contour":  # draw_mask_contour
        pts = [tuple(q) for q in case["points"]]
        w = case["w"]
        for dx in range(-w, w + 1):
            for dy in range(-w, w + 1):
                d.polygon([(x + dx, y + dy) for x, y in pts], outline=ink)
    else:
        raise ValueError(op)


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
            elif op == "mark_ellipse":
                case.update(box=rand_box(rng, w, h, frac, 1.0), width=wd, size_ratio=rng.uniform(1, 1.5),
                            aspect_ratio=rng.choice([1.0, rng.uniform(0.5, 2)]))
            elif op in ("mark_triangle", "composite"):
                case.update(points=rand_points(rng, w, h, 3, frac), width=wd)
            elif op == "mark_point":
                case.update(centre=rand_points(rng, w, h, 1, True)[0], radius=rng.uniform(1, 12),
                            aspect_ratio=rng.choice([1.0, rng.uniform(0.5, 2)]))
            elif op == "mark_scribble":
                case.update(control=rand_points(rng, w, h, 4, True), n=rng.choice([20, 100, 336, 1000]), width=wd)
            elif op == "mark_arrow":
                case.update(tip=rand_points(rng, w, h, 1, True)[0], angle=rng.uniform(0, 2 * math.pi),
                            length=rng.uniform(8, 60), head=rng.uniform(3, 20), width=wd,
                            head_kind=rng.choice(["filled", "open"]),
                            wobble=rng.choice([None, [rng.uniform(-5, 5), rng.uniform(-5, 5)]]))
            elif op == "mark_contour":
                case.update(points=rand_points(rng, w, h, rng.choice([3, 4, 6]), True), w=rng.choice([1, 2, 3]))
            elif op == "pieslice_filled":
                case.update(box=rand_box(rng, w, h, frac, 2.0), start=rng.uniform(-360, 360), end=rng.uniform(-360, 360))
            c.append(case)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--random", type=int, default=32, help="random cases per primitive")
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
