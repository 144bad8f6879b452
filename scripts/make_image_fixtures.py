#!/usr/bin/env python
"""Regenerate processor/tests/fixtures/image/: inputs and transformers (PIL backend) outputs
for processor/tests/processor/image_parity.rs.

Run with the project's venv (transformers 5.x, Pillow, scikit-image, numpy):

    .venv/bin/python scripts/make_image_fixtures.py

What it writes (all under processor/tests/fixtures/image/):

- inputs/*.png: photos from skimage.data, downsized here once and saved as PNG (both sides
  read these files), plus synthetic PNGs that exercise Pillow's modes: RGBA, LA, palette with
  tRNS, 16-bit RGB / RGBA / gray / gray+alpha, low bit depths with tRNS, interlaced, tiny,
  odd sizes; inputs/photo*.jpg (4:2:0, 4:4:4, progressive 4:2:2, gray) for the JPEG comparison.
- settings/<name>/: one model directory per processor setting, in the three layouts that
  exist (hub 4.x preprocessor_config.json, 5.x processor_config.json with the image
  processor nested, legacy int sizes); transformers loads them with
  AutoImageProcessor.from_pretrained(dir, backend="pil") and the Rust test with
  ImageProcessorConfig::from_model_dir.
- expected/*.png: for each (image, setting) case, the 8-bit image transformers feeds to
  rescale/normalize (same call with do_rescale=False, do_normalize=False), stored losslessly.
- settings/<name>/lut_f32le.bin: lut[c][v] = transformers' rescale+normalize of level v in
  channel c (3 x 256 little-endian float32), computed with the processor's own methods.
- manifest.json: the cases. The script checks that
  lut[c][u8[c, y, x]] reproduces transformers' pixel_values bit for bit (and zeros in the
  do_pad margin), so the Rust test compares against transformers' exact floats while the
  fixtures stay small.
- resize/*.png: PIL Image.resize outputs for the raw resize comparison.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import skimage.data
import transformers
from PIL import Image
from transformers import AutoImageProcessor

from common import REPO_ROOT, clip_preprocessor_config, fresh_dir, llava_processor_config, write_json

OUT = REPO_ROOT / "processor" / "tests" / "fixtures" / "image"


# --------------------------------------------------------------------------------------
# A minimal PNG writer, for what Pillow cannot write (16-bit RGB, low bit depths with tRNS,
# interlacing).


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _pack_row(samples: np.ndarray, bit_depth: int) -> bytes:
    """samples: 1-D array of samples for one row (channels interleaved)."""
    if bit_depth == 16:
        return samples.astype(">u2").tobytes()
    if bit_depth == 8:
        return samples.astype(np.uint8).tobytes()
    per_byte = 8 // bit_depth
    out = bytearray()
    for i in range(0, len(samples), per_byte):
        byte = 0
        group = samples[i : i + per_byte]
        for j, s in enumerate(group):
            byte |= int(s) << (8 - bit_depth * (j + 1))
        out.append(byte)
    return bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def write_png(path, samples, bit_depth, color_type, palette=None, trns=None, interlace=False):
    """samples: (H, W, C) integer array of raw PNG samples."""
    h, w, c = samples.shape
    raw = bytearray()
    if interlace:
        for x0, y0, dx, dy in ADAM7:
            sub = samples[y0::dy, x0::dx]
            if sub.shape[0] == 0 or sub.shape[1] == 0:
                continue
            for row in sub:
                raw += b"\x00" + _pack_row(row.reshape(-1), bit_depth)
    else:
        for row in samples:
            raw += b"\x00" + _pack_row(row.reshape(-1), bit_depth)
    png = b"\x89PNG\r\n\x1a\n"
    png += _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 1 if interlace else 0))
    if palette is not None:
        png += _chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    if trns is not None:
        png += _chunk(b"tRNS", trns)
    png += _chunk(b"IDAT", zlib.compress(bytes(raw), 9))
    png += _chunk(b"IEND", b"")
    Path(path).write_bytes(png)


# --------------------------------------------------------------------------------------
# Inputs


def make_inputs(d: Path) -> dict[str, str]:
    """Returns {name: description}."""
    d.mkdir(parents=True, exist_ok=True)
    desc = {}
    rng = np.random.default_rng(0)

    def save(name, im, text, **kw):
        im.save(d / name, **kw)
        desc[name] = text

    astro = Image.fromarray(skimage.data.astronaut()).resize((200, 200), Image.Resampling.LANCZOS)
    save("astronaut.png", astro, "skimage astronaut 512x512 -> 200x200 RGB")
    chelsea = Image.fromarray(skimage.data.chelsea()).resize((226, 150), Image.Resampling.LANCZOS)
    save("chelsea.png", chelsea, "skimage chelsea 451x300 -> 226x150 RGB (non-square, landscape)")
    coffee = Image.fromarray(skimage.data.coffee()).resize((120, 180), Image.Resampling.LANCZOS)
    save("coffee_portrait.png", coffee, "skimage coffee 600x400 squeezed to 120x180 RGB (portrait)")
    camera = Image.fromarray(skimage.data.camera()).resize((256, 256), Image.Resampling.LANCZOS)
    save("camera.png", camera, "skimage camera 512x512 -> 256x256 grayscale (mode L)")
    save("tiny.png", astro.resize((20, 10), Image.Resampling.BOX), "20x10 RGB, smaller than every crop")
    save("odd.png", chelsea.crop((40, 20, 77, 43)), "37x23 RGB crop (odd sizes)")

    # RGBA with real transparency: a radial alpha ramp, fully transparent corners.
    base = np.array(chelsea.crop((60, 10, 180, 100)))
    hh, ww = base.shape[:2]
    yy, xx = np.mgrid[0:hh, 0:ww]
    r = np.hypot((yy - hh / 2) / (hh / 2), (xx - ww / 2) / (ww / 2))
    alpha = np.clip(255 * (1.2 - r), 0, 255).astype(np.uint8)
    rgba = np.dstack([base, alpha])
    save("rgba.png", Image.fromarray(rgba, "RGBA"), "120x90 RGBA photo, radial alpha 0..255")

    la = np.dstack([np.array(camera.crop((60, 60, 140, 120))), alpha[:60, :80]])
    save("la.png", Image.fromarray(la, "LA"), "80x60 gray+alpha (mode LA)")

    pal = chelsea.crop((0, 0, 96, 64)).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    trns = bytes([0 if i % 7 == 0 else (255 if i % 3 else 100) for i in range(64)])
    pal.info["transparency"] = trns
    save("palette_trns.png", pal, "96x64 palette (P) with per-entry tRNS alphas", transparency=trns)
    pal_one = chelsea.crop((96, 0, 160, 48)).quantize(colors=32)
    save(
        "palette_one_trns.png",
        pal_one,
        "64x48 palette with one fully transparent index (tRNS as int)",
        transparency=3,
    )
    pal_plain = chelsea.crop((100, 50, 150, 90)).quantize(colors=16)
    save("palette.png", pal_plain, "50x40 palette without transparency")

    gray = np.array(camera.crop((0, 0, 64, 48)))
    gray_im = Image.fromarray(gray, "L")
    key = int(gray[10, 10])
    save("gray_trns.png", gray_im, f"64x48 L with tRNS key {key}", transparency=key)

    rgb = np.array(chelsea.crop((20, 30, 84, 78)))
    rgb[5:15, 5:25] = (12, 200, 34)
    write_png(d / "rgb_trns.png", rgb, 8, 2, trns=struct.pack(">HHH", 12, 200, 34))
    desc["rgb_trns.png"] = "64x48 RGB 8-bit with tRNS colour key (12,200,34)"

    # 16-bit: random low bytes, so high-byte truncation and rounding differ.
    src = np.array(chelsea.crop((100, 40, 148, 72))).astype(np.uint16)
    rgb16 = (src << 8) | rng.integers(0, 256, src.shape, dtype=np.uint16)
    write_png(d / "rgb16.png", rgb16, 16, 2)
    desc["rgb16.png"] = "48x32 RGB 16-bit (Pillow keeps the high byte)"
    a16 = (alpha[29:61, 36:84].astype(np.uint16) << 8) | rng.integers(0, 256, (32, 48), dtype=np.uint16)
    write_png(d / "rgba16.png", np.dstack([rgb16, a16]), 16, 6)
    desc["rgba16.png"] = "48x32 RGBA 16-bit"
    g16 = np.array(camera.crop((100, 100, 148, 132))).astype(np.uint16)
    write_png(d / "la16.png", np.dstack([(g16 << 8) | 0x80, a16]), 16, 4)
    desc["la16.png"] = "48x32 gray+alpha 16-bit (Pillow opens it as RGBA)"
    write_png(d / "gray16.png", (g16 * 4)[..., None], 16, 0)
    desc["gray16.png"] = "48x32 gray 16-bit, values 0..1020 (Pillow I;16 clamps to 255 on convert)"
    rgb16t = rgb16.copy()
    rgb16t[0:10, 0:20] = (0x1234, 0x0056, 0x0078)  # matches the key as 16-bit values
    rgb16t[20:30, 20:40] = (0x3400, 0x5611, 0x78FF)  # high bytes == low bytes of the key
    write_png(d / "rgb16_trns.png", rgb16t, 16, 2, trns=struct.pack(">HHH", 0x1234, 0x0056, 0x0078))
    desc["rgb16_trns.png"] = "48x32 RGB 16-bit with tRNS key (Pillow compares high bytes with the key's low bytes)"

    g2 = (np.array(camera.crop((0, 100, 40, 130))) >> 6).astype(np.uint8)
    write_png(d / "gray2_trns.png", g2[..., None], 2, 0, trns=struct.pack(">H", 0))
    desc["gray2_trns.png"] = "40x30 gray 2-bit with tRNS key 0"
    g4 = (np.array(camera.crop((50, 100, 83, 121))) >> 4).astype(np.uint8)
    write_png(d / "gray4.png", g4[..., None], 4, 0)
    desc["gray4.png"] = "33x21 gray 4-bit"
    g1 = (np.array(camera.crop((0, 0, 45, 30))) > 128).astype(np.uint8)
    write_png(d / "gray1_trns.png", g1[..., None], 1, 0, trns=struct.pack(">H", 1))
    desc["gray1_trns.png"] = "45x30 gray 1-bit with tRNS key 1"
    idx4 = (np.array(chelsea.crop((0, 60, 35, 85)).convert("L")) >> 4).astype(np.uint8)
    palette16 = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    write_png(d / "palette4_trns.png", idx4[..., None], 4, 3, palette=palette16, trns=bytes([255, 0, 128, 30]))
    desc["palette4_trns.png"] = "35x25 palette 4-bit, tRNS for the first 4 entries"
    inter = np.array(astro.crop((50, 40, 95, 73)))
    write_png(d / "interlaced.png", inter, 8, 2, interlace=True)
    desc["interlaced.png"] = "45x33 RGB Adam7-interlaced"
    tall = np.array(astro.resize((4, 500), Image.Resampling.BILINEAR))
    save("tall.png", Image.fromarray(tall), "4x500 RGB (Pillow 13 resizes it vertical pass first)")

    photo = chelsea.crop((40, 20, 200, 132))
    photo.save(d / "photo.jpg", quality=90)
    desc["photo.jpg"] = "160x112 crop of chelsea.png saved by Pillow as JPEG quality 90 (4:2:0)"
    photo.save(d / "photo444.jpg", quality=90, subsampling=0)
    desc["photo444.jpg"] = "the same crop saved as JPEG quality 90, 4:4:4"
    odd = chelsea.crop((41, 21, 198, 130))
    odd.save(d / "photo_prog422.jpg", quality=80, subsampling=1, progressive=True)
    desc["photo_prog422.jpg"] = "157x109 crop saved as progressive JPEG quality 80, 4:2:2 (odd size: edge upsampling)"
    odd.convert("L").save(d / "photo_gray.jpg", quality=85)
    desc["photo_gray.jpg"] = "the 157x109 crop in grayscale, JPEG quality 85 (Pillow mode L)"
    return desc


# --------------------------------------------------------------------------------------
# Settings (model directories)

# The preprocessor_config.json of llava-hf/vip-llava-7b-hf (hub, written by transformers 4.x).
HUB_336 = clip_preprocessor_config(336)

# name -> (layout, image processor dict)
SETTINGS = {
    "clip336": ("hub4", HUB_336),
    "tiny56": ("v5", {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}}),
    "legacy_int56": ("hub4", {"image_processor_type": "CLIPImageProcessor", "size": 56, "crop_size": 56}),
    "bilinear112": ("hub4", {**HUB_336, "size": {"shortest_edge": 112}, "crop_size": {"height": 112, "width": 112}, "resample": 2}),
    "exact_nocrop": ("v5", {"size": {"height": 90, "width": 130}, "do_center_crop": False}),
    "noresize_crop56": ("hub4", {**HUB_336, "do_resize": False, "crop_size": {"height": 56, "width": 56}}),
    "convert_only": ("hub4", {**HUB_336, "do_resize": False, "do_center_crop": False}),
    "longest_edge": ("hub4", {**HUB_336, "size": {"shortest_edge": 64, "longest_edge": 80}, "do_center_crop": False}),
    "max_hw": ("hub4", {**HUB_336, "size": {"max_height": 50, "max_width": 70}, "do_center_crop": False}),
    "pad": ("hub4", {**HUB_336, "size": {"height": 40, "width": 30}, "do_center_crop": False, "do_pad": True, "pad_size": {"height": 48, "width": 44}}),
    "lanczos_nonorm": ("hub4", {**HUB_336, "resample": 1, "size": {"shortest_edge": 70}, "crop_size": {"height": 64, "width": 60}, "do_normalize": False}),
    "nearest_norescale": ("hub4", {**HUB_336, "resample": 0, "size": {"shortest_edge": 45}, "crop_size": {"height": 40, "width": 40}, "do_rescale": False, "image_mean": 0.5, "image_std": [0.25, 0.5, 2.0]}),
    "box_hamming_custom": ("hub4", {**HUB_336, "resample": 4, "size": {"shortest_edge": 33}, "crop_size": {"height": 31, "width": 33}, "rescale_factor": 0.00390625, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
}

PHOTOS = ["astronaut.png", "chelsea.png", "coffee_portrait.png", "camera.png"]
SPECIAL = [
    "tiny.png", "odd.png", "rgba.png", "la.png", "palette_trns.png", "palette_one_trns.png", "palette.png",
    "gray_trns.png", "rgb_trns.png", "rgb16.png", "rgba16.png", "la16.png", "gray16.png", "rgb16_trns.png",
    "gray2_trns.png", "gray4.png", "gray1_trns.png", "palette4_trns.png", "interlaced.png", "tall.png",
]

CASES = (
    [(img, "clip336") for img in ["astronaut.png", "camera.png", "tiny.png"]]
    + [(img, "tiny56") for img in PHOTOS + SPECIAL]
    + [(img, "legacy_int56") for img in ["chelsea.png"]]
    + [(img, "bilinear112") for img in ["astronaut.png", "coffee_portrait.png", "odd.png", "palette_trns.png"]]
    + [(img, "exact_nocrop") for img in ["chelsea.png", "tiny.png", "rgba.png"]]
    + [(img, "noresize_crop56") for img in ["tiny.png", "odd.png", "rgb16.png"]]
    + [(img, "convert_only") for img in SPECIAL if img != "tall.png"]
    + [(img, "longest_edge") for img in ["chelsea.png", "coffee_portrait.png", "tiny.png"]]
    + [(img, "max_hw") for img in ["chelsea.png", "coffee_portrait.png", "odd.png"]]
    + [(img, "pad") for img in ["chelsea.png", "odd.png"]]
    + [(img, "lanczos_nonorm") for img in ["chelsea.png", "la16.png"]]
    + [(img, "nearest_norescale") for img in ["astronaut.png", "odd.png"]]
    + [(img, "box_hamming_custom") for img in ["coffee_portrait.png"]]
    + [("photo.jpg", "tiny56"), ("photo.jpg", "bilinear112"), ("photo444.jpg", "tiny56")]
    + [("photo_prog422.jpg", "tiny56"), ("photo_gray.jpg", "tiny56")]
)


def write_setting(d: Path, layout: str, cfg: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if layout == "hub4":
        write_json(d / "preprocessor_config.json", cfg, sort_keys=False)
        # the hub also has a processor_config.json without an image processor in it
        write_json(d / "processor_config.json", llava_processor_config(image_token=None), sort_keys=False)
    else:
        # What transformers 5.x LlavaProcessor.save_pretrained writes: the image processor
        # nested in processor_config.json (tokenizer files dropped: not needed here).
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlavaProcessor, PreTrainedTokenizerFast
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
        fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
        proc = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(**cfg), tokenizer=fast, patch_size=14,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template="{{ 'x' }}",
        )
        tmp = d / "_tmp"
        proc.save_pretrained(tmp)
        shutil.copy(tmp / "processor_config.json", d / "processor_config.json")
        shutil.rmtree(tmp)
        assert "image_processor" in json.loads((d / "processor_config.json").read_text())


def f32_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def to_png_bytes(u8_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.moveaxis(u8_chw, 0, -1))).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main() -> None:
    fresh_dir(OUT)
    inputs = OUT / "inputs"
    descriptions = make_inputs(inputs)

    processors = {}
    settings_manifest = {}
    luts = {}
    for name, (layout, cfg) in SETTINGS.items():
        d = OUT / "settings" / name
        write_setting(d, layout, cfg)
        ip = AutoImageProcessor.from_pretrained(d, backend="pil")
        assert type(ip).__name__ == "CLIPImageProcessorPil", type(ip)
        processors[name] = ip
        # lut[c][v]: transformers' own rescale + normalize applied to every level.
        levels = np.tile(np.arange(256, dtype=np.uint8)[None, None, :], (3, 1, 1))
        x = levels
        if ip.do_rescale:
            x = ip.rescale(x, ip.rescale_factor)
        if ip.do_normalize:
            x = ip.normalize(x, ip.image_mean, ip.image_std)
        x = np.asarray(x)
        lut = np.ascontiguousarray(x.astype(np.float32)[:, 0, :])
        assert lut.shape == (3, 256) and x.dtype == np.float32
        (d / "lut_f32le.bin").write_bytes(lut.astype("<f4").tobytes())
        settings_manifest[name] = {"layout": layout, "lut": f"settings/{name}/lut_f32le.bin"}
        luts[name] = f32_bits(lut)

    # A directory with both files: the nested 5.x config must win.
    both = OUT / "settings" / "both_layouts"
    write_setting(both, "v5", SETTINGS["tiny56"][1])
    write_json(both / "preprocessor_config.json", HUB_336, sort_keys=False)
    assert AutoImageProcessor.from_pretrained(both, backend="pil").size.shortest_edge == 56

    expected_dir = OUT / "expected"
    expected_dir.mkdir(parents=True)
    cases = []
    for img_name, setting in CASES:
        ip = processors[setting]
        path = inputs / img_name
        full = ip(images=Image.open(path), return_tensors="np")["pixel_values"][0]
        raw = ip(images=Image.open(path), do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        content = raw
        if ip.do_pad:
            content = ip(images=Image.open(path), do_rescale=False, do_normalize=False, do_pad=False,
                         return_tensors="np")["pixel_values"][0]
        assert content.dtype == np.uint8, content.dtype
        ch, chh, cw = content.shape
        lut = luts[setting]
        # The reconstruction the Rust test does must give transformers' floats exactly.
        recon = np.zeros(full.shape, dtype=np.uint32)
        for c in range(3):
            recon[c, :chh, :cw] = lut[c][content[c]]
        assert full.dtype == np.float32, full.dtype
        assert np.array_equal(recon, f32_bits(full)), (img_name, setting)
        out_name = f"{Path(img_name).stem}__{setting}.png"
        (expected_dir / out_name).write_bytes(to_png_bytes(content))
        cases.append({"image": img_name, "setting": setting, "expected": f"expected/{out_name}",
                      "shape": list(full.shape), "content_shape": [chh, cw]})

    # Raw resize: PIL Image.resize on RGB images, several sizes and all filters.
    resize_dir = OUT / "resize"
    resize_dir.mkdir()
    resize_cases = []
    # Pillow 13 runs the vertical pass first iff in_h - out_h > 2 * (in_w - out_w) (and the
    # height shrinks): 37x23 -> 27x3 is the tie (horizontal first), 28x3 just past it.
    sources = {"odd.png": [(11, 7), (37, 23), (100, 61), (20, 50), (37, 9), (5, 23), (27, 3), (28, 3)],
               "astronaut.png": [(37, 29), (61, 200), (150, 60)],
               "tall.png": [(3, 60), (9, 100), (4, 499), (2, 7)]}
    for src, sizes in sources.items():
        im = Image.open(inputs / src).convert("RGB")
        for (w, h) in sizes:
            for f in [0, 1, 2, 3, 4, 5]:
                if src == "astronaut.png" and f not in (2, 3):
                    continue
                out = im.resize((w, h), resample=f)
                name = f"{Path(src).stem}_{w}x{h}_f{f}.png"
                out.save(resize_dir / name, optimize=True)
                resize_cases.append({"source": src, "width": w, "height": h, "filter": f, "expected": f"resize/{name}"})

    # LLaVA's expand2square (image_aspect_ratio "pad"), then the processor.
    def expand2square(pil_img, background_color):
        width, height = pil_img.size
        if width == height:
            return pil_img
        if width > height:
            result = Image.new(pil_img.mode, (width, width), background_color)
            result.paste(pil_img, (0, (width - height) // 2))
        else:
            result = Image.new(pil_img.mode, (height, height), background_color)
            result.paste(pil_img, ((height - width) // 2, 0))
        return result

    pad_color = tuple(int(x * 255) for x in processors["clip336"].image_mean)
    assert pad_color == (122, 116, 104), pad_color
    expand_cases = []
    for img_name in ["chelsea.png", "coffee_portrait.png", "odd.png"]:
        ip = processors["tiny56"]
        square = expand2square(Image.open(inputs / img_name).convert("RGB"), pad_color)
        full = ip(images=square, return_tensors="np")["pixel_values"][0]
        raw = ip(images=square, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        recon = np.stack([luts["tiny56"][c][raw[c]] for c in range(3)])
        assert np.array_equal(recon, f32_bits(full))
        out_name = f"{Path(img_name).stem}__expand2square_tiny56.png"
        (expected_dir / out_name).write_bytes(to_png_bytes(raw))
        expand_cases.append({"image": img_name, "setting": "tiny56", "expected": f"expected/{out_name}",
                             "shape": list(full.shape), "content_shape": list(raw.shape[1:])})

    # Inputs Pillow refuses, for the error tests.
    errors = OUT / "errors"
    errors.mkdir()
    head = b"\x89PNG\r\n\x1a\n"
    idat = _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b"")
    (errors / "zero_height.png").write_bytes(head + _chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 0, 8, 2, 0, 0, 0)) + idat)
    (errors / "bomb.png").write_bytes(head + _chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + idat)
    for name, exc in [("zero_height.png", Exception), ("bomb.png", Image.DecompressionBombError)]:
        try:
            Image.open(errors / name).load()
        except exc:
            pass
        else:
            raise AssertionError(f"Pillow accepted {name}")

    # JPEG: what Pillow (libjpeg-turbo) decodes, for the decoder comparison.
    jpeg = []
    for name in ["photo.jpg", "photo444.jpg", "photo_prog422.jpg", "photo_gray.jpg"]:
        im = Image.open(inputs / name)
        dec = f"expected/{Path(name).stem}_pil_decoded.png"
        im.convert("RGB").save(OUT / dec, optimize=True)
        jpeg.append({"image": name, "pil_decoded": dec})

    manifest = {
        "generated_by": "scripts/make_image_fixtures.py",
        "versions": {"transformers": transformers.__version__, "pillow": PIL.__version__, "numpy": np.__version__},
        "inputs": descriptions,
        "settings": settings_manifest,
        "cases": cases,
        "expand2square": expand_cases,
        "resize": resize_cases,
        "jpeg": jpeg,
    }
    write_json(OUT / "manifest.json", manifest, indent=None, sort_keys=False, separators=(",", ":"))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {len(resize_cases)} resize cases, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
