#!/usr/bin/env python3
"""Write the random benchmark checkpoint (benches/configs/clip-l-llama-1b) in HF hub layout.

The real CLIP ViT-L/14-336 vision tower shape and a ~1.1B Llama (hidden 2048, 22 layers, 32 heads,
4 kv heads, intermediate 5632, vocab 32064), random weights (seeded), written by transformers'
``save_pretrained`` so that both ``VipLlavaForConditionalGeneration.from_pretrained`` and
``vipllava`` load the same files. Never committed: about 5.7 GB (f32) and 2.8 GB (bf16).

The PyTorch comparison uses no tokenizer: the vocabulary is random anyway, so both benchmark sides
feed the same token ids (``bench_prompt_ids`` in ``common.py``, mirrored by ``vipllava bench``). The
image processor config (CLIP 336) is written so both sides preprocess the photo the same way. The
stand-in tokenizer and chat template of ``make_random_checkpoint.py`` (``common.write_text_files``)
are written too, for ``vipllava bench --devices ... --dtypes ...`` (the backend comparison runs the
real pipeline).

Set-up: see scripts/make_fixtures.py (``.venv``). Run::

    .venv/bin/python scripts/make_bench_checkpoint.py --out bench-data

writes ``bench-data/clip-l-llama-1b-f32/``, ``bench-data/clip-l-llama-1b-bf16/`` and
``bench-data/astronaut.png`` (scikit-image's astronaut photo, 512x512).
"""

import argparse
import json
import os
import time

import torch

from common import (REPO_ROOT, clip_preprocessor_config, fresh_dir, llava_processor_config, torch_dtype,
                    write_json, write_text_files)

CONFIG_DIR = REPO_ROOT / "benches" / "configs" / "clip-l-llama-1b"

# CLIP 336 as on the hub, without the "processor_class" entry
PROCESSOR_CONFIG = clip_preprocessor_config(336, processor_class=False)


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

    with open(CONFIG_DIR / "config.json") as f:
        config_dict = json.load(f)
    config = VipLlavaConfig(**{k: v for k, v in config_dict.items() if k != "architectures"})
    torch.manual_seed(args.seed)
    t0 = time.time()
    model = VipLlavaForConditionalGeneration(config).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n:,} parameters in {time.time() - t0:.1f} s")

    for dtype in args.dtypes.split(","):
        out = os.path.join(args.out, f"clip-l-llama-1b-{dtype}")
        fresh_dir(out)
        t0 = time.time()
        model.to(torch_dtype(dtype)).save_pretrained(out, max_shard_size="2GB")
        # without a final newline, as this script has always written these two
        write_json(os.path.join(out, "preprocessor_config.json"), PROCESSOR_CONFIG, end="")
        write_json(os.path.join(out, "processor_config.json"), llava_processor_config(image_processor=PROCESSOR_CONFIG),
                   end="")
        write_text_files(out)
        print(f"wrote {out} in {time.time() - t0:.1f} s")
        model.to(torch.float32)


if __name__ == "__main__":
    main()
