#!/usr/bin/env python3
"""Write a random VipLlava checkpoint of a chosen size (hub layout, bf16), for memory and
speed measurements of training and export between the tiny fixtures and the 7B.

Same files and layout as `make_random_checkpoint.py` (hub transformers 4.x keys, bf16 shards
with `model.safetensors.index.json`, processor, chat template, stand-in tokenizer) but the
text and vision sizes come from the command line. The defaults give about 0.9 B parameters
(1.7 GB): a Llama of 8 layers, hidden 2048, and a CLIP tower of 12 layers, hidden 1024, on
112-pixel images (64 image tokens, so a training step is quick).

    /path/to/venv/bin/python scripts/make_scaled_checkpoint.py --out /tmp/vip-scaled

Never committed.
"""

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

from common import clip_preprocessor_config, llava_processor_config, write_json, write_text_files
from make_random_checkpoint import HUB_CONFIG, tensor_shapes

SHARD_BYTES = 5 * 1000**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-layers", type=int, default=8)
    ap.add_argument("--text-hidden", type=int, default=2048)
    ap.add_argument("--text-intermediate", type=int, default=5632)
    ap.add_argument("--text-heads", type=int, default=16)
    ap.add_argument("--vision-layers", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=112)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(HUB_CONFIG) as f:
        config = json.load(f)
    config["text_config"].update({
        "num_hidden_layers": args.text_layers,
        "hidden_size": args.text_hidden,
        "intermediate_size": args.text_intermediate,
        "num_attention_heads": args.text_heads,
        "num_key_value_heads": args.text_heads,
    })
    config["vision_config"].update({"num_hidden_layers": args.vision_layers, "image_size": args.image_size})
    # Five feature layers that exist in a tower of this depth.
    n = args.vision_layers
    config.pop("vision_feature_layer", None)
    config["vision_feature_layers"] = [-2, -3, -4, -5, n // 2]
    shapes = tensor_shapes(config)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"{len(shapes)} tensors, {total:,} parameters ({total * 2 / 1e9:.2f} GB bf16)")
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []
    start = time.time()

    def flush():
        nonlocal shard, shard_bytes
        name = f"part-{len(files) + 1}.safetensors"
        save_file(shard, os.path.join(args.out, name), metadata={"format": "pt"})
        files.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        if name.endswith("norm.weight") or ("layer_norm" in name and name.endswith(".weight")) or \
                name.endswith("layrnorm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += nbytes
    flush()
    # Hub names once the shard count is known.
    for i, (name, keys) in enumerate(files):
        hub = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(args.out, name), os.path.join(args.out, hub))
        for k in keys:
            weight_map[k] = hub
    write_json(os.path.join(args.out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    config["torch_dtype"] = "bfloat16"
    config["text_config"]["torch_dtype"] = "bfloat16"
    write_json(os.path.join(args.out, "config.json"), config)
    write_json(os.path.join(args.out, "generation_config.json"),
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001})
    write_json(os.path.join(args.out, "preprocessor_config.json"), clip_preprocessor_config(args.image_size))
    write_json(os.path.join(args.out, "processor_config.json"), llava_processor_config())
    write_text_files(args.out)
    print(f"done in {time.time() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
