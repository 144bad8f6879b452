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

from make_fixtures import to_hub4_key

HERE = os.path.dirname(os.path.abspath(__file__))
HUB_CONFIG = os.path.join(HERE, "..", "tests", "fixtures", "hub-7b-config", "config.json")
SHARD_BYTES = 5 * 1000**3

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% elif message['role'] == 'user' %}{{ '###Human: '}}{% else %}{{ '###' + message['role'].title() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)

CLIP = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}


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


def tokenizer_json() -> dict:
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    while len(vocab) < 32000:
        vocab[f"filler{len(vocab)}"] = len(vocab)

    def added(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), added(32000, "<image>"),
                         added(32001, "<pad>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        # ByteFallback before Replace: with no word pieces, even "\u2581" arrives as bytes.
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def write_text_files(out: str) -> None:
    """The stand-in tokenizer (ids < 32000, `<image>` = 32000, `<pad>` = 32001) and the hub's
    chat template: enough for `vipllava generate` and `bench --devices` on random weights."""
    write_json(os.path.join(out, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    write_json(os.path.join(out, "tokenizer.json"), tokenizer_json())
    write_json(os.path.join(out, "tokenizer_config.json"),
               {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "unk_token": "<unk>", "legacy": False, "padding_side": "left",
                "tokenizer_class": "LlamaTokenizer", "processor_class": "LlavaProcessor"})


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


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
        print(f"wrote {name} ({shard_bytes / 1e9:.2f} GB) at {time.time() - start:.0f} s", flush=True)
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
    write_json(os.path.join(args.out, "preprocessor_config.json"), CLIP)
    write_json(os.path.join(args.out, "processor_config.json"),
               {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    write_text_files(args.out)
    print(f"done in {time.time() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
