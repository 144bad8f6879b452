#!/usr/bin/env python
"""Regenerate processor/tests/fixtures/pillow_marks/: what `vipllava draw` must produce by
default, made with Pillow (tested in processor/tests/processor/visual_prompt.rs, `training_marks_*`).

Needs only Pillow (any venv; Pillow 13.0.0 made the committed set):

    python3 -m venv /tmp/venv-pil && /tmp/venv-pil/bin/pip install pillow
    /tmp/venv-pil/bin/python scripts/make_mark_fixtures.py

Each case is a list of marks given as the CLI gives them (`{"shape": "box", "spec":
"10,12,60,40:red"}`, optional per-mark "alpha" and "line_width") plus the draw options
(point radius, arrow head size and kind). Every mark is drawn the way ViP-LLaVA's training
code (llava/visual_prompt_generator.py, image_blending) draws its marks: the ImageDraw calls
below on a transparent RGBA layer of the image's size, alpha-composited onto the image
(Image.alpha_composite, one layer per mark, in order), then converted to RGB. The geometry is
the user's instead of the training code's random draws:

    box          rectangle([x0, y0, x1, y1], outline=ink, width=W)
    ellipse      ellipse([x0, y0, x1, y1], outline=ink, width=W)
    triangle     line([p0, p1, p2, p0], fill=ink, width=W, joint="curve")
    point        ellipse([x - r, y - r, x + r, y + r], outline=ink, fill=ink)
    arrow        line([tip, tip + (L - H) * u], fill=ink, width=W), then the head: sides of
                 length H at +-60 degrees around the shaft from the tip, polygon(fill=ink)
                 or line(fill=ink, width=W)
    scribble     line([p_i, p_i+1], fill=ink, width=W) along the Catmull-Rom curve through
                 the points (cubic Bezier spans sampled at about 3 samples per pixel of
                 their control polygon, linspace-style parameters)
    mask         polygon(points, fill=ink)
    mask-contour polygon(points + (dx, dy), outline=ink) for every (dx, dy) in [-w, w]^2

with W = max(int(line width), 1), default line width max(int(3 * max(W, H) / 336), 1),
default point radius max(int(8 * max(W, H) / 336), 1), default head
H = min(max(0.35 * L, int(6 * max(W, H) / 336)), L), contour w = max(W // 2, 1), default
alpha 128 (88 for masks). Images: flat grey, 160x106 (s < 1), 336x224 (s = 1) and
700x460 (s > 1); coordinates exactly representable as f32 (multiples of 1/4).

What it writes: <W>x<H>.png per image size (the cases' results stacked top to bottom) and
manifest.json ({"backdrop": [r, g, b], "cases": [{"name", "size", "top", "marks",
"options"}]}).
"""

from __future__ import annotations

import argparse
import json
import math

from PIL import Image, ImageDraw

import common

OUT = common.REPO_ROOT / "processor" / "tests" / "fixtures" / "pillow_marks"
SIZES = [(160, 106), (336, 224), (700, 460)]
BACKDROP = (128, 128, 128)
COLOURS = {
    "red": (255, 0, 0),
    "lime": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "fuchsia": (255, 0, 255),
    "aqua": (0, 255, 255),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "gold": (255, 215, 0),
}


def training_size(k: int, w: int, h: int) -> int:
    return max(int(k * max(w, h) / 336), 1)


def numbers(spec: str) -> tuple[list[float], tuple[int, int, int]]:
    body, _, colour = spec.partition(":")
    rgb = COLOURS[colour] if colour in COLOURS else COLOURS["red"]
    if colour.startswith("#"):
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    vals = [float(v) for v in body.replace(";", ",").split(",")]
    return vals, rgb


def pairs(vals: list[float]) -> list[tuple[float, float]]:
    return [(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)]


def bezier(p, n):
    step = 1.0 / (n - 1) if n > 1 else 0.0
    out = []
    for i in range(n):
        t = 1.0 if (n > 1 and i == n - 1) else i * step + 0.0
        u = 1.0 - t

        def c(a, b, cc, d):
            return u**3.0 * a + 3.0 * u**2.0 * t * b + 3.0 * u * t**2.0 * cc + t**3.0 * d

        out.append((c(p[0][0], p[1][0], p[2][0], p[3][0]), c(p[0][1], p[1][1], p[2][1], p[3][1])))
    return out


def scribble_samples(points):
    p = []
    for q in points:
        if not p or p[-1] != q:
            p.append(q)
    n = len(p)

    def dist(a, b):
        return math.sqrt((b[0] - a[0]) * (b[0] - a[0]) + (b[1] - a[1]) * (b[1] - a[1]))

    spans = []
    for i in range(n - 1):
        a, b, c, d = p[max(i - 1, 0)], p[i], p[i + 1], p[min(i + 2, n - 1)]
        c1 = (b[0] + (c[0] - a[0]) / 6.0, b[1] + (c[1] - a[1]) / 6.0)
        c2 = (c[0] - (d[0] - b[0]) / 6.0, c[1] - (d[1] - b[1]) / 6.0)
        spans.append((b, c1, c2, c))
    budget = max(200_000 // len(spans), 2)
    out = []
    for i, s in enumerate(spans):
        length = dist(s[0], s[1]) + dist(s[1], s[2]) + dist(s[2], s[3])
        count = min(max(math.ceil(length * 3.0), 2), budget)
        out.extend(bezier(s, count)[1 if i > 0 else 0 :])
    return out


def draw_mark(d: ImageDraw.ImageDraw, mark: dict, options: dict, size) -> None:
    w, h = size
    vals, rgb = numbers(mark["spec"])
    shape = mark["shape"]
    alpha = mark.get("alpha", 88 if shape == "mask" else 128)
    ink = rgb + (alpha,)
    lw = mark.get("line_width", training_size(3, w, h))
    width = max(int(lw), 1)
    if shape == "box":
        d.rectangle(vals, outline=ink, width=width)
    elif shape == "ellipse":
        d.ellipse(vals, outline=ink, width=width)
    elif shape == "triangle":
        p = pairs(vals)
        d.line([p[0], p[1], p[2], p[0]], fill=ink, width=width, joint="curve")
    elif shape == "point":
        x, y = vals
        r = float(options.get("point_radius", training_size(8, w, h)))
        d.ellipse([x - r, y - r, x + r, y + r], outline=ink, fill=ink)
    elif shape == "arrow":
        x0, y0, x1, y1 = vals
        dx, dy = x0 - x1, y0 - y1
        length = math.sqrt(dx * dx + dy * dy)
        if "arrow_head_size" in options:
            head = min(float(options["arrow_head_size"]), length)
        else:
            head = min(max(0.35 * length, float(int(6 * max(w, h) / 336))), length)
        angle = math.atan2(dy, dx)
        shaft = length - head
        end = (x1 + shaft * math.cos(angle), y1 + shaft * math.sin(angle))
        d.line([(x1, y1), end], fill=ink, width=width)
        third = math.pi / 3
        pts = [
            (x1 + head * math.cos(angle + third), y1 + head * math.sin(angle + third)),
            (x1, y1),
            (x1 + head * math.cos(angle - third), y1 + head * math.sin(angle - third)),
        ]
        if options.get("arrow_head", "filled") == "open":
            d.line(pts, fill=ink, width=width)
        else:
            d.polygon(pts, fill=ink)
    elif shape == "scribble":
        samples = scribble_samples(pairs(vals))
        for a, b in zip(samples, samples[1:]):
            d.line([a, b], fill=ink, width=width)
    elif shape == "mask":
        d.polygon(pairs(vals), fill=ink)
    elif shape == "mask-contour":
        half = max(width // 2, 1)
        pts = pairs(vals)
        for ox in range(-half, half + 1):
            for oy in range(-half, half + 1):
                d.polygon([(x + ox, y + oy) for x, y in pts], outline=ink)
    else:
        raise ValueError(shape)


def render(case: dict) -> Image.Image:
    size = tuple(case["size"])
    img = Image.new("RGB", size, BACKDROP).convert("RGBA")
    for mark in case["marks"]:
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        draw_mark(ImageDraw.Draw(layer), mark, case["options"], size)
        img = Image.alpha_composite(img, layer)
    return img.convert("RGB")


def q(v: float) -> str:
    """A coordinate rounded to a quarter pixel (exact in f32), written short."""
    v = round(v * 4) / 4
    return str(int(v)) if v == int(v) else repr(v)


def spec(vals, colour: str) -> str:
    return ",".join(q(v) for v in vals) + ":" + colour


def cases_for(w: int, h: int) -> list[dict]:
    def X(f):
        return f * w

    def Y(f):
        return f * h

    def m(shape, vals, colour="red", **kw):
        return dict(shape=shape, spec=spec(vals, colour), **kw)

    tri = [X(0.3), Y(0.2), X(0.7), Y(0.35), X(0.45), Y(0.8)]
    poly = [X(0.2), Y(0.3), X(0.6), Y(0.2), X(0.8), Y(0.7), X(0.35), Y(0.85)]
    out = [
        ("box", [m("box", [round(X(0.2)), round(Y(0.2)), round(X(0.7)), round(Y(0.75))])], {}),
        ("box_fractional_w1", [m("box", [X(0.21) + 0.25, Y(0.33) + 0.5, X(0.66) + 0.75, Y(0.9) + 0.25], "#3366ff", line_width=1)], {}),
        ("box_outside_w12", [m("box", [-X(0.1), Y(0.5), X(0.4), Y(1.2)], "lime", line_width=12, alpha=255)], {}),
        ("ellipse", [m("ellipse", [X(0.15), Y(0.1), X(0.85), Y(0.9)], "lime")], {}),
        ("ellipse_fractional_w5", [m("ellipse", [X(0.3) + 0.25, Y(0.25) + 0.75, X(0.55) + 0.5, Y(0.7) + 0.25], line_width=5)], {}),
        ("ellipse_outside_w8", [m("ellipse", [X(0.6), -Y(0.3), X(1.3), Y(0.5)], "orange", line_width=8, alpha=200)], {}),
        ("triangle", [m("triangle", tri, "blue")], {}),
        ("triangle_w12", [m("triangle", tri, "yellow", line_width=12)], {}),
        ("triangle_fractional_w5", [m("triangle", [v + 0.25 for v in tri], line_width=5, alpha=255)], {}),
        ("point", [m("point", [X(0.5), Y(0.5)], "yellow")], {}),
        ("point_radius", [m("point", [X(0.3) + 0.5, Y(0.6) + 0.25], "aqua")], {"point_radius": 5.5}),
        ("point_outside", [m("point", [X(0.99), Y(0.02)], "fuchsia")], {}),
        ("arrow", [m("arrow", [X(0.1), Y(0.9), X(0.5), Y(0.4)], "aqua")], {}),
        ("arrow_open_w3", [m("arrow", [X(0.9), Y(0.1), X(0.4), Y(0.6)], line_width=3)], {"arrow_head": "open"}),
        ("arrow_head_size", [m("arrow", [X(0.2), Y(0.5), X(0.8) + 0.5, Y(0.45) + 0.25], "purple")], {"arrow_head_size": 12}),
        ("arrow_short", [m("arrow", [X(0.5), Y(0.5), X(0.5) + 3, Y(0.5) + 2], "red", alpha=255)], {}),
        ("arrow_outside_open", [m("arrow", [X(0.5), Y(0.5), X(1.05), Y(-0.1)], "gold", line_width=5)], {"arrow_head": "open"}),
        ("scribble_two_points", [m("scribble", [X(0.1), Y(0.1), X(0.8), Y(0.6)], "fuchsia")], {}),
        ("scribble", [m("scribble", [X(0.1), Y(0.5), X(0.3), Y(0.2), X(0.5), Y(0.7), X(0.8), Y(0.4)], "fuchsia")], {}),
        ("scribble_fractional_w12", [m("scribble", [X(0.2) + 0.25, Y(0.8), X(0.4), Y(0.3) + 0.5, X(0.6) + 0.75, Y(0.9), X(0.9), Y(0.2), X(0.95), Y(0.6)], "lime", line_width=12)], {}),
        ("mask", [m("mask", poly, "orange")], {}),
        ("mask_outside", [m("mask", [-X(0.2), Y(0.1), X(0.5), Y(0.4), X(0.1), Y(1.3)], "purple", alpha=120)], {}),
        ("mask_contour", [m("mask-contour", poly, "purple")], {}),
        ("mask_contour_w6", [m("mask-contour", [v + 0.5 for v in poly], "gold", line_width=6)], {}),
    ]
    every = [mk for _, marks, _ in out if not any("line_width" in x or "alpha" in x for x in marks) for mk in marks]
    out.append(("every_shape_in_order", every, {}))
    return [dict(name=n, size=[w, h], marks=marks, options=opts) for n, marks, opts in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    out = common.fresh_dir(args.out)
    cases = []
    for w, h in SIZES:
        mine = cases_for(w, h)
        images = [render(c) for c in mine]
        atlas = Image.new("RGB", (w, h * len(images)))
        for i, (case, im) in enumerate(zip(mine, images)):
            case["top"] = i * h
            atlas.paste(im, (0, i * h))
        atlas.save(out / f"{w}x{h}.png", optimize=True)
        cases.extend(mine)
    lines = ",\n".join(json.dumps(c) for c in cases)
    (out / "manifest.json").write_text(
        '{"backdrop": ' + json.dumps(list(BACKDROP)) + ', "cases": [\n' + lines + "\n]}\n"
    )
    common.log(f"{len(cases)} cases -> {out}")


if __name__ == "__main__":
    main()
