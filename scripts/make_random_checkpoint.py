#!/usr/bin/env python3
"""Write a random checkpoint with the exact vip-llava-7b architecture in the hub layout.

Same files as `llava-hf/vip-llava-7b-hf` (hub transformers 4.x key layout, bf16 safetensors
shards of at most 5 GB with `model.safetensors.index.json`, the hub `config.json` with its
stray `vision_feature_layer: -2`, processor, chat template, generation config) but random
weights (normal, std 0.02, seeded) and a stand-in tokenizer: the Llama special tokens, 256
byte tokens, filler tokens up to id 31999, then `<image>` = 32000 and `<pad>` = 32001 as on the
hub. Text is byte-encoded, so prompts are longer in tokens than with the real vocabulary.

About 14 GB on disk and never committed. Tensors are generated and written shard by shard, so
the script needs about one shard of memory (5 GB), not the model's.

    .venv/bin/python scripts/make_random_checkpoint.py --out /tmp/vip-llava-7b-random

Used for the 7B memory and speed figures in BENCHMARKS.md (`vipllava generate --dtype bf16`,
`--quantize q8`).
"""

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

from common import (REPO_ROOT, clip_preprocessor_config, llava_processor_config, log, to_hub4_key, write_json,
                    write_text_files)

HUB_CONFIG = REPO_ROOT / "tests" / "fixtures" / "hub-7b-config" / "config.json"
SHARD_BYTES = 5 * 1000**3

def tensor_shapes(hub_config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the hub checkpoint, from transformers on the meta device."""
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    cfg = dict(hub_config)
    cfg.pop("architectures", None)
    # The stray scalar means the default five layers (see DESIGN.md); say so explicitly.
    cfg["vision_feature_layers"] = [-2, -5, -8, -11, 6]
    cfg.pop("vision_feature_layer", None)
    with torch.device("meta"):
        model = VipLlavaForConditionalGeneration(VipLlavaConfig(**cfg))
    return [(to_hub4_key(k), tuple(v.shape)) for k, v in model.state_dict().items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(HUB_CONFIG) as f:
        hub_config = json.load(f)
    shapes = tensor_shapes(hub_config)
    total = sum(torch.Size(s).numel() for _, s in shapes)
    n_shards = -(-total * 2 // SHARD_BYTES)
    print(f"{len(shapes)} tensors, {total:,} parameters, {n_shards} shards")

    gen = torch.Generator().manual_seed(args.seed)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 1
    start = time.time()

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, os.path.join(args.out, name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        log(f"wrote {name} ({shard_bytes / 1e9:.2f} GB) at {time.time() - start:.0f} s")
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape in shapes:
        nbytes = torch.Size(shape).numel() * 2
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            flush()
        if name.endswith("norm.weight") or "layer_norm" in name and name.endswith(".weight") or \
                name.endswith("layrnorm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += nbytes
    flush()
    assert index - 1 == n_shards, (index, n_shards)

    write_json(os.path.join(args.out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    write_json(os.path.join(args.out, "config.json"), hub_config)
    write_json(os.path.join(args.out, "generation_config.json"),
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001})
    write_json(os.path.join(args.out, "preprocessor_config.json"), clip_preprocessor_config(336))
    write_json(os.path.join(args.out, "processor_config.json"), llava_processor_config())
    write_text_files(args.out)
    print(f"done in {time.time() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
