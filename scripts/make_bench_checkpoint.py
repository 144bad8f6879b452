#!/usr/bin/env python3
"""Write the random benchmark checkpoint (benches/configs/clip-l-llama-1b) in HF hub layout.

The real CLIP ViT-L/14-336 vision tower shape and a ~1.1B Llama (hidden 2048, 22 layers, 32 heads,
4 kv heads, intermediate 5632, vocab 32064), random weights (seeded), written by transformers'
``save_pretrained`` so that both ``VipLlavaForConditionalGeneration.from_pretrained`` and
``vipllava`` load the same files. Never committed: about 5.7 GB (f32) and 2.8 GB (bf16).

The PyTorch comparison uses no tokenizer: the vocabulary is random anyway, so both benchmark sides
feed the same token ids (``bench_prompt_ids`` below, mirrored by ``vipllava bench``). The image
processor config (CLIP 336) is written so both sides preprocess the photo the same way. The
stand-in tokenizer and chat template of ``make_random_checkpoint.py`` are written too, for
``vipllava bench --devices ... --dtypes ...`` (the backend comparison runs the real pipeline).

Set-up: see scripts/make_fixtures.py (``.venv``). Run::

    .venv/bin/python scripts/make_bench_checkpoint.py --out bench-data

writes ``bench-data/clip-l-llama-1b-f32/``, ``bench-data/clip-l-llama-1b-bf16/`` and
``bench-data/astronaut.png`` (scikit-image's astronaut photo, 512x512).
"""

import argparse
import json
import os
import shutil
import time

import torch

from make_random_checkpoint import write_text_files

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "..", "benches", "configs", "clip-l-llama-1b")

PROCESSOR_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


def bench_prompt_ids(image_tokens, text_tokens, vocab, image_token):
    """BOS, the image tokens, then `text_tokens` deterministic text ids (same rule as `vipllava bench`)."""
    ids = [1] + [image_token] * image_tokens
    for i in range(text_tokens):
        t = 3 + (i * 7919) % max(vocab - 3, 1)
        ids.append(t + 1 if t == image_token else t)
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-data")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    os.makedirs(args.out, exist_ok=True)
    from skimage import data
    from PIL import Image

    Image.fromarray(data.astronaut()).save(os.path.join(args.out, "astronaut.png"))

    with open(os.path.join(CONFIG_DIR, "config.json")) as f:
        config_dict = json.load(f)
    config = VipLlavaConfig(**{k: v for k, v in config_dict.items() if k != "architectures"})
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = VipLlavaForConditionalGeneration(config).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n:,} parameters in {time.time() - t0:.1f} s")

    for dtype in args.dtypes.split(","):
        torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
        out = os.path.join(args.out, f"clip-l-llama-1b-{dtype}")
        if os.path.exists(out):
            shutil.rmtree(out)
        t0 = time.time()
        model.to(torch_dtype).save_pretrained(out, max_shard_size="2GB")
        with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
            json.dump(PROCESSOR_CONFIG, f, indent=2, sort_keys=True)
        with open(os.path.join(out, "processor_config.json"), "w") as f:
            json.dump(
                {
                    "image_processor": PROCESSOR_CONFIG,
                    "image_token": "<image>",
                    "num_additional_image_tokens": 1,
                    "patch_size": 14,
                    "processor_class": "LlavaProcessor",
                    "vision_feature_select_strategy": "default",
                },
                f,
                indent=2,
                sort_keys=True,
            )
        write_text_files(out)
        print(f"wrote {out} in {time.time() - t0:.1f} s")
        model.to(torch.float32)


if __name__ == "__main__":
    main()
