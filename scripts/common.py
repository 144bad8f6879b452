"""What more than one script in ``scripts/`` needs.

Belongs here: a helper or constant that two or more scripts share. Small file writers (JSON,
fresh output directories) and logging; the hub 4.x checkpoint key names; the files of the
llava-hf hub repos that several scripts write (CLIP image processor config, processor config,
chat template, the added-token entries, the stand-in tokenizer of the random checkpoints); and
rules that the Rust side mirrors (``bench_prompt_ids``). What only one script uses stays in that
script.

Importing this module must stay cheap: only the standard library at the top; torch and
transformers are imported inside the functions that need them.

The scripts run as ``python3 scripts/NAME.py`` (or ``.venv/bin/python scripts/NAME.py``) from the
repository root, so ``scripts/`` is on ``sys.path`` and they ``import common``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# files and logging
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path, obj, *, indent=2, sort_keys=True, end="\n", **dumps_kwargs) -> None:
    """Write ``json.dumps(obj, ...)`` and then `end` to `path` (str or Path). The defaults (indent 2,
    sorted keys, a final newline) are the fixtures' format; the other arguments go to json.dumps."""
    Path(path).write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, **dumps_kwargs) + end)


def fresh_dir(path) -> Path:
    """An empty directory at `path` (str or Path): removed first if it exists, parents created."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------------------------
# torch settings (torch imported lazily)
# --------------------------------------------------------------------------------------------


def torch_dtype(name: str):
    """The torch dtype of a ``--dtype`` name: f32, bf16 or f16."""
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def deterministic_torch() -> None:
    """One CPU thread (reproducible reductions) and deterministic algorithms."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------------
# hub 4.x checkpoint layout
# --------------------------------------------------------------------------------------------


def to_hub4_key(k: str) -> str:
    """transformers 5.x module names -> hub (transformers 4.x) checkpoint names."""
    for src, dst in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if k.startswith(src):
            return dst + k[len(src) :]
    raise KeyError(k)


# VipLlava's five CLIP hidden states, what a hub 4.x config without the plural
# `vision_feature_layers` key means.
DEFAULT_LAYERS = [-2, -5, -8, -11, 6]


def hub_config_overrides(model_dir) -> dict:
    """`from_pretrained` keyword arguments that load a hub 4.x VipLlava directory as 4.x meant it:
    the 7B hub config has no `vision_feature_layers` but a stray LLaVA `"vision_feature_layer": -2`,
    which transformers 5.x reads as one layer (a 1024-wide projector) and then refuses the
    5120-wide projector weights (DESIGN.md). Empty for every other config."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if isinstance(config.get("vision_feature_layer"), int) and "vision_feature_layers" not in config:
        return {"vision_feature_layer": list(DEFAULT_LAYERS)}
    return {}


# --------------------------------------------------------------------------------------------
# processor files of the llava-hf hub repos
# --------------------------------------------------------------------------------------------

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The chat template published with llava-hf/vip-llava-7b-hf (verbatim; DESIGN.md section 7).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}"
    "{% elif message['role'] == 'user' %}{{ '###Human: '}}{% else %}{{ '###' + message['role'].title() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '###Assistant:' }}{% endif %}"
)


def clip_preprocessor_config(size: int, processor_class: bool = True) -> dict:
    """The preprocessor_config.json of llava-hf/vip-llava-7b-hf (written by transformers 4.x) for
    `size` x `size` images: CLIPImageProcessor, bicubic resize of the shortest edge to `size`,
    centre crop, CLIP mean/std; keys in the file's (alphabetical) order. `processor_class=False`
    leaves out the "processor_class" entry."""
    cfg = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }
    if not processor_class:
        del cfg["processor_class"]
    return cfg


def llava_processor_config(patch_size: int = 14, image_token: str | None = "<image>",
                           image_processor: dict | None = None) -> dict:
    """processor_config.json of a llava-hf repo: the LlavaProcessor settings, keys in alphabetical
    order. `image_processor` (a preprocessor config) is nested as transformers 5.x writes it (the hub
    4.x file has none); `image_token=None` leaves that entry out."""
    cfg = {}
    if image_processor is not None:
        cfg["image_processor"] = image_processor
    if image_token is not None:
        cfg["image_token"] = image_token
    cfg.update(num_additional_image_tokens=1, patch_size=patch_size, processor_class="LlavaProcessor",
               vision_feature_select_strategy="default")
    return cfg


def load_processor(path: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), backend="pil")


# --------------------------------------------------------------------------------------------
# tokenizer files
# --------------------------------------------------------------------------------------------


def added_token_json(content: str) -> dict:
    """An added (special) token as tokenizer.json and tokenizer_config.json list it, without its id."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def tokenizer_json() -> dict:
    """The stand-in tokenizer of the random checkpoints: the Llama special tokens, 256 byte tokens,
    filler tokens up to id 31999, then `<image>` = 32000 and `<pad>` = 32001 as on the hub."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    while len(vocab) < 32000:
        vocab[f"filler{len(vocab)}"] = len(vocab)

    def added(i, content):
        return {"id": i, **added_token_json(content)}

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


# --------------------------------------------------------------------------------------------
# benchmark inputs
# --------------------------------------------------------------------------------------------


def bench_prompt_ids(image_tokens, text_tokens, vocab, image_token):
    """BOS, the image tokens, then `text_tokens` deterministic text ids (same rule as `vipllava bench`)."""
    ids = [1] + [image_token] * image_tokens
    for i in range(text_tokens):
        t = 3 + (i * 7919) % max(vocab - 3, 1)
        ids.append(t + 1 if t == image_token else t)
    return ids
