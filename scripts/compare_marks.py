#!/usr/bin/env python
"""How close `vipllava draw` is to the training code's drawing, per shape, on a real photo.

For every shape, draws one mark on the chelsea photo (160x106, and enlarged to 672x445 with
Pillow's bicubic, as a user's larger photo) three ways: with Pillow the way ViP-LLaVA's
training code draws (scripts/make_mark_fixtures.py's `draw_mark`, alpha-composited as
image_blending does), with `vipllava draw` (default: Pillow-exact) and with
`vipllava draw --smooth` (anti-aliased). Prints, per shape and size, the share of pixels that
differ from Pillow and the largest channel difference.

    /tmp/venv-pil/bin/python scripts/compare_marks.py --bin target/release/vipllava
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

import common
from make_mark_fixtures import draw_mark

PHOTO = common.REPO_ROOT / "tests" / "fixtures" / "images" / "chelsea.png"


def marks(w: int, h: int) -> list[tuple[str, str]]:
    """(shape, spec) at the same relative place on any size; coordinates in whole pixels."""

    def p(*fr: float) -> str:
        return ",".join(str(round(f * (w if i % 2 == 0 else h))) for i, f in enumerate(fr))

    def poly(*fr: float) -> str:
        return ";".join(p(fr[i], fr[i + 1]) for i in range(0, len(fr), 2))

    return [
        ("box", p(0.25, 0.15, 0.72, 0.9) + ":red"),
        ("ellipse", p(0.2, 0.1, 0.75, 0.95) + ":lime"),
        ("triangle", p(0.3, 0.2, 0.7, 0.35, 0.45, 0.8) + ":blue"),
        ("point", p(0.5, 0.5) + ":yellow"),
        ("arrow", p(0.1, 0.9, 0.45, 0.45) + ":aqua"),
        ("scribble", poly(0.1, 0.5, 0.3, 0.2, 0.5, 0.7, 0.8, 0.4) + ":fuchsia"),
        ("mask", poly(0.2, 0.3, 0.6, 0.2, 0.8, 0.7, 0.35, 0.85) + ":orange"),
        ("mask-contour", poly(0.2, 0.3, 0.6, 0.2, 0.8, 0.7, 0.35, 0.85) + ":purple"),
    ]


def pillow(photo: Image.Image, shape: str, spec: str) -> Image.Image:
    layer = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    draw_mark(ImageDraw.Draw(layer), {"shape": shape, "spec": spec}, {}, photo.size)
    return Image.alpha_composite(photo.convert("RGBA"), layer).convert("RGB")


def ours(binary: str, photo_path: Path, out: Path, shape: str, spec: str, smooth: bool) -> Image.Image:
    cmd = [binary, "draw", "--image", str(photo_path), "--out", str(out), f"--{shape}", spec]
    if smooth:
        cmd.append("--smooth")
    subprocess.run(cmd, check=True, capture_output=True)
    return Image.open(out).convert("RGB")


def stats(a: Image.Image, b: Image.Image) -> tuple[float, int]:
    raw = ImageChops.difference(a, b).tobytes()
    differing = sum(1 for i in range(0, len(raw), 3) if raw[i] or raw[i + 1] or raw[i + 2])
    return differing / (len(raw) // 3), max(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(common.REPO_ROOT / "target" / "release" / "vipllava"))
    args = ap.parse_args()
    small = Image.open(PHOTO).convert("RGB")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big_path = tmp / "chelsea_672.png"
        small.resize((672, 445), Image.BICUBIC).save(big_path)
        print("| shape | size | smooth: differing | smooth: max diff | default: differing | default: max diff |")
        print("|---|---|---|---|---|---|")
        for photo_path in (PHOTO, big_path):
            photo = Image.open(photo_path).convert("RGB")
            w, h = photo.size
            for shape, spec in marks(w, h):
                ref = pillow(photo, shape, spec)
                s = stats(ours(args.bin, photo_path, tmp / "s.png", shape, spec, True), ref)
                d = stats(ours(args.bin, photo_path, tmp / "d.png", shape, spec, False), ref)
                print(f"| {shape} | {w}x{h} | {s[0]:.2%} | {s[1]} | {d[0]:.2%} | {d[1]} |")


if __name__ == "__main__":
    main()
