#!/usr/bin/env python3
"""Regenerate the tiny VipLlava test checkpoints and their reference outputs.

Everything is built locally with random (seeded) weights; nothing is downloaded.
The outputs are committed under ``tests/fixtures/`` and read by the Rust tests.

Set-up (CPU only is enough; the committed files were made with torch 2.15, transformers 5.24.0,
tokenizers 0.23.3, Pillow 13.0, scikit-image 0.26)::

    python3 -m venv .venv
    .venv/bin/pip install torch
    .venv/bin/pip install "transformers>=5,<6" safetensors numpy pillow tokenizers scikit-image

Run (from the repository root; about 15 s on 2 cores)::

    .venv/bin/python scripts/make_fixtures.py            # writes tests/fixtures/
    .venv/bin/python scripts/make_fixtures.py --out /tmp/fx --only tiny-gqa-f16
    .venv/bin/python scripts/make_fixtures.py --no-phase2   # checkpoints + reference.* only
    .venv/bin/python scripts/make_fixtures.py --no-phase3   # phases 1 and 2 only

Re-running with the same library versions rewrites byte-identical files (fixed seeds, one CPU
thread, sorted JSON; the BPE training and PNG encoding are deterministic too). Phases 2 and 3 do not
touch the phase-1 files (weights, config.json, generation_config.json, reference.*).

Fixtures (one directory each, laid out like a HF hub repo)::

    tiny-5x-f32/             transformers 5.x dialect, 5.x key layout (model.language_model.*,
                             lm_head.*, model.vision_tower.*), single f32 file, 12 vision layers,
                             default vision_feature_layer [-2,-5,-8,-11,6]
    tiny-hub-bf16-sharded/   hub 4.x dialect + layout (language_model.model.*, vision_tower.vision_model.*),
                             bf16, 2 shards + index, the 7B hub's stray "vision_feature_layer": -2 and no
                             plural key (meaning: the default five layers), LlamaConfig defaults
                             (rms 1e-6, theta 1e4, silu, 2048), rope_scaling {"type": "linear", "factor": 2}
    tiny-gqa-f16/            5.x dialect, f16, GQA (4 heads / 2 kv), head_dim 24 != 64/4, attention and
                             mlp biases, llama3 rope, 4 vision layers, vision_feature_layer [-1, 2].
                             Written by transformers 5.x's *default* save_pretrained, which (5.24) reverts
                             to the "original" key layout: language_model.model.*, language_model.lm_head.*,
                             vision_tower.embeddings.* (no vision_model segment), multi_modal_projector.*
    tiny-hub-tied-dynamic/   hub 4.x dialect + layout, f32, tied embeddings (no lm_head tensor),
                             dynamic NTK rope with max_position_embeddings 32 < prompt length,
                             plural vision_feature_layers [-1, 0, 3], 4 vision layers
    hub-7b-config/           the real llava-hf/vip-llava-7b-hf config.json (no weights) + expected counts

Each checkpoint directory holds ``reference.safetensors`` (input_ids, pixel_values,
vision_hidden_state.{k}, image_features, logits, logits_last, rope_inv_freq) and
``reference.json`` (versions, resolved settings, num_parameters, shapes, cross-checks).

Reference outputs are computed in float32 eval mode from the weights *as stored*
(f16/bf16 weights are rounded to the file dtype first, then upcast).

Phase 2 (tokenizer, processor, images, generation; layout and quirks in tests/fixtures/README.md)::

    images/*.png, images/pixel_values.safetensors, images/inputs.json
                             6 small PNGs from skimage.data (RGB, grayscale L, RGBA with transparency,
                             3:1), their pixel_values [1,3,56,56] and per-image question/prompt/input_ids
    <tiny fixture>/          tokenizer + processor files: 5.x set (processor_config.json with nested image
                             processor, chat_template.jinja, tokenizer.json, tokenizer_config.json) for
                             tiny-5x-f32 / tiny-gqa-f16; hub 4.x set (preprocessor_config.json,
                             processor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json,
                             special_tokens_map.json) for the two tiny-hub-* fixtures
    <tiny fixture>/generation_reference.{json,safetensors}
                             per image: input_ids, logits_last [1,512], 20 greedy tokens + decoded text
    <tiny fixture>/cached_reference.{json,safetensors}
                             prefill L-8 tokens of the phase-1 input, then 8 cached single-token steps:
                             cached_step_logits [8,512]
    chat_template_vectors.json, tokenizer_vectors.json, tokenizer-legacy-4x/

Phase 3 (batched / multi-image / multi-turn; layout in tests/fixtures/README.md)::

    <tiny fixture>/batch_reference.{json,safetensors}
                             3 requests of different lengths, left-padded and generated as one batch (20 greedy
                             tokens) and each alone; one prompt with two images (10 greedy tokens, last logits);
                             a user/assistant/user conversation (last logits of one full forward)

Phase 2 reuses the in-memory models of phase 1 (``BUILT_MODELS``), so the hub-4.x fixtures need no
config workaround, and it resets the (stateful) dynamic-rope state before every reference run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

import transformers
from safetensors.torch import save_file
from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from common import (CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, DEFAULT_LAYERS, REPO_ROOT, added_token_json, clip_preprocessor_config,
                    deterministic_torch, fresh_dir, llava_processor_config, load_processor, log, to_hub4_key,
                    write_json)

DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

IMAGE_TOKEN = 500
PAD_TOKEN = 501
BOS, EOS = 1, 2
VOCAB = 512
HUB4_VERSION = "4.36.0.dev0"

# Common tiny sizes
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
    num_channels=3,
    hidden_act="quick_gelu",
    projection_dim=16,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD_TOKEN,
    max_position_embeddings=256,
)
NUM_IMAGE_TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 16 ("default" strategy drops CLS)

# fixture name -> the in-memory model phase 1 built (f32, weights rounded to the file dtype)
BUILT_MODELS: dict[str, VipLlavaForConditionalGeneration] = {}

# The real llava-hf/vip-llava-7b-hf config.json (transformers 4.36.0.dev0).
HUB_7B_CONFIG = {
    "architectures": ["VipLlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "vipllava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "projector_layernorm": False,
    "projector_layernorm_eps": 1e-05,
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def build_model(config: VipLlavaConfig) -> VipLlavaForConditionalGeneration:
    model = VipLlavaForConditionalGeneration(config)
    return model.float().eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int, store_dtype: torch.dtype) -> None:
    """Re-initialise every parameter with enough spread that outputs are not flat,
    then round to the on-disk dtype (so the f32 reference equals what the file holds)."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}"
            if isinstance(module, (nn.LayerNorm, LlamaRMSNorm)):
                if p_name == "weight":
                    val = 1.0 + 0.2 * (2.0 * torch.rand(p.shape, generator=g) - 1.0)  # 1 +- 0.2
                else:
                    val = normal(p.shape, 0.1)
            elif p_name == "bias":
                val = normal(p.shape, 0.1)
            elif isinstance(module, nn.Conv2d):
                val = normal(p.shape, 0.05)  # fan_in 588
            elif isinstance(module, nn.Embedding):
                val = normal(p.shape, 0.5)
            elif full.endswith("class_embedding"):
                val = normal(p.shape, 0.5)
            elif mod_name == "lm_head":
                val = normal(p.shape, 0.3)
            elif isinstance(module, nn.Linear):
                val = normal(p.shape, 0.15)
            else:
                raise RuntimeError(f"unhandled parameter {full}")
            p.copy_(val.to(store_dtype).to(p.dtype))


def make_inputs(seed: int, n_pre: int = 7, n_post: int = 16):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, 500, (n_pre,), generator=g)
    post = torch.randint(3, 500, (n_post,), generator=g)
    ids = torch.cat(
        [torch.tensor([BOS]), pre, torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN), post]
    ).unsqueeze(0).to(torch.int64)
    pixel_values = torch.randn((1, VISION["num_channels"], VISION["image_size"], VISION["image_size"]), generator=g)
    return ids, pixel_values


def resolved_layers(config: VipLlavaConfig) -> list[int]:
    v = config.vision_feature_layer
    return [v] if isinstance(v, int) else list(v)


@torch.no_grad()
def compute_reference(model: VipLlavaForConditionalGeneration, input_ids, pixel_values) -> dict:
    cfg = model.config
    layers = resolved_layers(cfg)
    vt = model.model.vision_tower(pixel_values, output_hidden_states=True)
    ref = {"input_ids": input_ids.clone(), "pixel_values": pixel_values.clone()}
    for k, layer in enumerate(layers):
        ref[f"vision_hidden_state.{k}"] = vt.hidden_states[layer].clone()

    feats = model.model.get_image_features(pixel_values).pooler_output
    feats = feats.reshape(1, -1, cfg.text_config.hidden_size)
    ref["image_features"] = feats.clone()

    # Cross-check get_image_features against the hidden states we store.
    manual = torch.cat([vt.hidden_states[i][:, 1:] for i in layers], dim=-1)
    manual = model.model.multi_modal_projector(manual)
    assert torch.equal(manual, feats), "projector cross-check failed"

    out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False)
    ref["logits"] = out.logits.float().clone()
    ref["logits_last"] = out.logits[:, -1, :].float().clone()
    # inv_freq actually used by the (last) forward pass; for dynamic rope this is the rescaled one
    ref["rope_inv_freq"] = model.model.language_model.rotary_emb.inv_freq.float().clone()
    return {k: v.contiguous() for k, v in ref.items()}


def eager_vs_default(model, input_ids, pixel_values, logits) -> float:
    """Same forward with eager attention: difference documents how tight f32 agreement is."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        out = m(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
    return float((out - logits).abs().max())


@torch.no_grad()
def rope_sensitivity(model, input_ids, pixel_values, logits) -> float:
    """max |logits - logits with plain (unscaled) rope of the same theta|: shows that the fixture
    actually exercises the rope scaling (a port that ignored it would fail at 1e-4)."""
    cfg = copy.deepcopy(model.config)
    cfg.text_config.rope_parameters = {
        "rope_type": "default",
        "rope_theta": model.config.text_config.rope_parameters["rope_theta"],
    }
    plain = build_model(cfg)
    plain.load_state_dict(model.state_dict())
    out = plain(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
    return float((out - logits).abs().max())


def num_parameters_used(model: VipLlavaForConditionalGeneration) -> tuple[int, list[str]]:
    """Parameters that actually influence the logits: drop CLIP post_layernorm and the
    encoder layers past the deepest selected hidden state."""
    cfg = model.config
    n_layers = cfg.vision_config.num_hidden_layers
    deepest = max(i % (n_layers + 1) for i in resolved_layers(cfg))  # hidden_states index
    unused_prefixes = ["model.vision_tower.post_layernorm."] + [
        f"model.vision_tower.encoder.layers.{i}." for i in range(deepest, n_layers)
    ]
    total = 0
    for name, p in model.named_parameters():
        if not any(name.startswith(u) for u in unused_prefixes):
            total += p.numel()
    return total, unused_prefixes


def text_settings(cfg: VipLlavaConfig) -> dict:
    t = cfg.text_config
    return {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "attention_bias": t.attention_bias,
        "mlp_bias": t.mlp_bias,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "rope_parameters": dict(t.rope_parameters),
    }


def vision_settings(cfg: VipLlavaConfig) -> dict:
    v = cfg.vision_config
    return {
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }


def write_reference(
    out_dir: Path,
    model: VipLlavaForConditionalGeneration,
    ref: dict,
    meta: dict,
) -> dict:
    save_file(ref, str(out_dir / "reference.safetensors"), metadata={"format": "pt"})
    BUILT_MODELS[out_dir.name] = model  # phase 2 reuses the in-memory model
    cfg = model.config
    used, unused = num_parameters_used(model)
    info = {
        "fixture": out_dir.name,
        "generated_by": "scripts/make_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "vision_feature_layers": resolved_layers(cfg),
        "vision_feature_select_strategy": "default",
        "image_token_index": cfg.image_token_index,
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "projector_layernorm_eps": cfg.projector_layernorm_eps,
        "projector_hidden_act": cfg.projector_hidden_act,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "rope_type": cfg.text_config.rope_parameters["rope_type"],
        "text": text_settings(cfg),
        "vision": vision_settings(cfg),
        "num_parameters": model.num_parameters(),
        "num_parameters_used": used,
        "unused_parameter_prefixes": unused,
        "max_abs_logit": float(ref["logits"].abs().max()),
        "logits_std": float(ref["logits"].std()),
        "reference_dtype": "float32 (weights rounded to the file dtype, then run in f32, eval, no cache)",
        "shapes": {k: list(v.shape) for k, v in sorted(ref.items())},
        "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sorted(ref.items())},
        "notes": {
            "vision_hidden_state.k": "hidden_states[vision_feature_layers[k]] of the CLIP tower "
            "(output_hidden_states=True; index 0 = pre_layrnorm output), CLS included",
            "image_features": "model.get_image_features(pixel_values).pooler_output, reshaped to "
            "[num_images, num_patches, text_hidden]",
            "logits": "single full forward (no cache), position_ids = arange(L)",
            "rope_inv_freq": "LlamaRotaryEmbedding.inv_freq after that forward (dynamic rope: rescaled "
            "for seq_len = max(position_ids)+1 = L)",
        },
    }
    info.update(meta)
    write_json(out_dir / "reference.json", info)
    return info


# --------------------------------------------------------------------------------------------
# key layouts / hub 4.x writing
# --------------------------------------------------------------------------------------------


def hub4_state_dict(model, dtype: torch.dtype, with_position_ids: bool) -> dict:
    sd = {}
    tied = bool(model.config.tie_word_embeddings)
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue  # a tied 4.x checkpoint does not store the lm_head
        sd[to_hub4_key(k)] = v.detach().to(dtype).contiguous().clone()
    if with_position_ids:
        n = model.model.vision_tower.embeddings.num_positions
        sd["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    return sd


def hub4_generation_config(path: Path) -> None:
    write_json(
        path / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": PAD_TOKEN,
            "transformers_version": HUB4_VERSION,
        },
    )


def vision_config_hub4(num_layers: int) -> dict:
    # as in the real hub config: hidden_act omitted (CLIPVisionConfig default quick_gelu),
    # stray vocab_size and projection_dim kept
    return {
        "hidden_size": VISION["hidden_size"],
        "image_size": VISION["image_size"],
        "intermediate_size": VISION["intermediate_size"],
        "model_type": "clip_vision_model",
        "num_attention_heads": VISION["num_attention_heads"],
        "num_hidden_layers": num_layers,
        "patch_size": VISION["patch_size"],
        "projection_dim": VISION["projection_dim"],
        "vocab_size": 32000,
    }


def tiny_hub4_config(dtype: str, vision_layers: int, text: dict, **top) -> dict:
    """A hub 4.x config.json (as transformers 4.36 wrote them) of the tiny sizes in `dtype` ("float32",
    "bfloat16"): the entries both tiny hub fixtures share, `text` added to text_config and `top` to the top
    level; keys sorted, as in the hub files."""
    text_config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": TEXT["hidden_size"],
        "intermediate_size": TEXT["intermediate_size"],
        "model_type": "llama",
        "num_attention_heads": TEXT["num_attention_heads"],
        "num_hidden_layers": TEXT["num_hidden_layers"],
        "torch_dtype": dtype,
        "vocab_size": VOCAB,
        **text,
    }
    cfg = {
        "architectures": ["VipLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN,
        "model_type": "vipllava",
        "pad_token_id": PAD_TOKEN,
        "projector_hidden_act": "gelu",
        "projector_layernorm_eps": 1e-05,
        "text_config": dict(sorted(text_config.items())),
        "torch_dtype": dtype,
        "transformers_version": HUB4_VERSION,
        "vision_config": vision_config_hub4(vision_layers),
        "vocab_size": VOCAB,
        **top,
    }
    return dict(sorted(cfg.items()))


def config_from_hub4(hub_cfg: dict, explicit_layers: list[int] | None) -> VipLlavaConfig:
    """Build the transformers 5.x config for a hub 4.x config dict. `explicit_layers` replaces
    the stray singular key (which 5.x would otherwise read as the feature layer)."""
    d = copy.deepcopy(hub_cfg)
    if explicit_layers is not None:
        d.pop("vision_feature_layers", None)
        d["vision_feature_layer"] = list(explicit_layers)
    return VipLlavaConfig(**d)


@torch.no_grad()
def crosscheck_from_pretrained(path: Path, ref: dict, **kwargs) -> dict:
    """Load the written files back with transformers' from_pretrained and compare logits."""
    try:
        m = VipLlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
        logits = m(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], use_cache=False).logits
        return {
            "ok": True,
            "kwargs": {k: v for k, v in kwargs.items()},
            "max_abs_diff_logits": float((logits - ref["logits"]).abs().max()),
            "tied_lm_head_is_embed": m.lm_head.weight.data_ptr()
            == m.model.language_model.embed_tokens.weight.data_ptr(),
        }
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return {"ok": False, "kwargs": {k: v for k, v in kwargs.items()}, "error": f"{type(e).__name__}: {e}"[:400]}


def transformers_reads_as(hub_cfg: dict) -> dict:
    """What transformers 5.x makes of the file as-is (documentation of its misreading)."""
    c = VipLlavaConfig(**copy.deepcopy(hub_cfg))
    return {
        "vision_feature_layer": c.vision_feature_layer
        if isinstance(c.vision_feature_layer, int)
        else list(c.vision_feature_layer),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "rope_parameters": dict(c.text_config.rope_parameters),
    }


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def make_tiny_5x_f32(out: Path) -> dict:
    path = fresh_dir(out / "tiny-5x-f32")
    cfg = VipLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=12, **VISION),
        text_config=dict(model_type="llama", **TEXT),
        image_token_index=IMAGE_TOKEN,
        pad_token_id=PAD_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=list(DEFAULT_LAYERS),
        image_seq_length=NUM_IMAGE_TOKENS,
    )
    model = build_model(cfg)
    randomize(model, seed=1001, store_dtype=torch.float32)
    # 5.x module names in the file (save_original_format=False); the default of 5.24 would
    # revert to the legacy names (see tiny-gqa-f16)
    model.save_pretrained(str(path), save_original_format=False)
    ids, pv = make_inputs(seed=2001)
    ref = compute_reference(model, ids, pv)
    meta = {
        "key_layout": "hf5",
        "key_layout_detail": "model.language_model.*, lm_head.weight, model.vision_tower.{embeddings,pre_layrnorm,"
        "encoder,post_layernorm}.*, model.multi_modal_projector.* (save_pretrained(save_original_format=False))",
        "config_dialect": "hf5",
        "dtype_on_disk": "float32",
        "weight_files": ["model.safetensors"],
        "tie_word_embeddings_read_from": "top-level config.tie_word_embeddings (5.x)",
        "crosscheck_from_pretrained": crosscheck_from_pretrained(path, ref),
        "eager_vs_sdpa_max_abs_diff": eager_vs_default(model, ids, pv, ref["logits"]),
    }
    return write_reference(path, model, ref, meta)


def make_tiny_hub_bf16_sharded(out: Path) -> dict:
    path = fresh_dir(out / "tiny-hub-bf16-sharded")
    hub_cfg = tiny_hub4_config(
        "bfloat16",
        vision_layers=12,
        text={
            # no rms_norm_eps / rope_theta / hidden_act / max_position_embeddings: LlamaConfig defaults
            "_name_or_path": "lmsys/vicuna-tiny",
            "pad_token_id": 0,
            "rope_scaling": {"factor": 2.0, "type": "linear"},
        },
        projector_layernorm=False,
        vision_feature_layer=-2,  # stray LLaVA key, as in the real 7B hub config
        vision_feature_select_strategy="default",
    )
    cfg = config_from_hub4(hub_cfg, DEFAULT_LAYERS)
    model = build_model(cfg)
    randomize(model, seed=1002, store_dtype=torch.bfloat16)

    sd = hub4_state_dict(model, torch.bfloat16, with_position_ids=True)
    keys = list(sd.keys())  # module order
    # split inside language-model layer 1: its attention tensors in shard 1, its mlp/norms in shard 2
    split_layer = "language_model.model.layers.1."
    layer_keys = [k for k in keys if k.startswith(split_layer)]
    first_of_layer = keys.index(layer_keys[0])
    cut = first_of_layer + len(layer_keys) // 2
    shards = [keys[:cut], keys[cut:]]
    assert any(k.startswith(split_layer) for k in shards[0]) and any(k.startswith(split_layer) for k in shards[1])
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map, total = {}, 0
    for name, ks in zip(names, shards):
        save_file({k: sd[k] for k in ks}, str(path / name), metadata={"format": "pt"})
        for k in ks:
            weight_map[k] = name
            total += sd[k].numel() * sd[k].element_size()
    write_json(
        path / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    write_json(path / "config.json", hub_cfg)
    hub4_generation_config(path)

    ids, pv = make_inputs(seed=2002)
    ref = compute_reference(model, ids, pv)
    meta = {
        "key_layout": "hub4",
        "key_layout_detail": "language_model.model.*, language_model.lm_head.weight, vision_tower.vision_model.*, "
        "multi_modal_projector.*; plus the int64 buffer vision_tower.vision_model.embeddings.position_ids",
        "config_dialect": "hub4",
        "dtype_on_disk": "bfloat16",
        "weight_files": names + ["model.safetensors.index.json"],
        "sharding": f"split inside {split_layer}* ({len(shards[0])} + {len(shards[1])} tensors)",
        "vision_feature_layers_source": "no plural key; stray singular vision_feature_layer=-2 ignored -> "
        "default [-2,-5,-8,-11,6] (projector_layernorm width 5*32 = 160 confirms)",
        "text_config_defaults_applied": {
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
        },
        "tie_word_embeddings_read_from": "absent everywhere -> false",
        "transformers_5x_reads_file_as": transformers_reads_as(hub_cfg),
        "crosscheck_from_pretrained": crosscheck_from_pretrained(
            path, ref, vision_feature_layer=list(DEFAULT_LAYERS)
        ),
        "logits_diff_if_rope_scaling_ignored": rope_sensitivity(model, ids, pv, ref["logits"]),
    }
    return write_reference(path, model, ref, meta)


def make_tiny_gqa_f16(out: Path) -> dict:
    path = fresh_dir(out / "tiny-gqa-f16")
    text = dict(TEXT)
    text.update(
        num_key_value_heads=2,
        head_dim=24,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    cfg = VipLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=4, **VISION),
        text_config=dict(model_type="llama", **text),
        image_token_index=IMAGE_TOKEN,
        pad_token_id=PAD_TOKEN,
        projector_hidden_act="gelu",
        vision_feature_layer=[-1, 2],
        image_seq_length=NUM_IMAGE_TOKENS,
    )
    model = build_model(cfg)
    randomize(model, seed=1003, store_dtype=torch.float16)
    # default save_pretrained of transformers 5.24: config dtype float16, legacy ("original") key names
    # (save a half copy: casting `model` itself would also round the rope inv_freq buffer)
    copy.deepcopy(model).to(torch.float16).save_pretrained(str(path))
    ids, pv = make_inputs(seed=2003)
    ref = compute_reference(model, ids, pv)

    # which llama3 band each frequency falls into
    rp = cfg.text_config.rope_parameters
    d = cfg.text_config.head_dim
    bands = []
    for i in range(0, d, 2):
        wl = 2 * math.pi * rp["rope_theta"] ** (i / d)
        lo = rp["original_max_position_embeddings"] / rp["low_freq_factor"]
        hi = rp["original_max_position_embeddings"] / rp["high_freq_factor"]
        bands.append("kept" if wl < hi else ("scaled" if wl > lo else "interpolated"))
    meta = {
        "key_layout": "hf5-original",
        "key_layout_detail": "transformers 5.24 default save_pretrained (save_original_format=True): "
        "language_model.model.*, language_model.lm_head.weight, vision_tower.{embeddings,pre_layrnorm,encoder,"
        "post_layernorm}.* (NO vision_model segment), multi_modal_projector.*",
        "config_dialect": "hf5",
        "dtype_on_disk": "float16",
        "weight_files": ["model.safetensors"],
        "llama3_bands": bands,
        "logits_diff_if_rope_scaling_ignored": rope_sensitivity(model, ids, pv, ref["logits"]),
        "tie_word_embeddings_read_from": "top-level config.tie_word_embeddings (5.x)",
        "crosscheck_from_pretrained": crosscheck_from_pretrained(path, ref),
    }
    return write_reference(path, model, ref, meta)


def make_tiny_hub_tied_dynamic(out: Path) -> dict:
    path = fresh_dir(out / "tiny-hub-tied-dynamic")
    hub_cfg = tiny_hub4_config(
        "float32",
        vision_layers=4,
        text={
            "max_position_embeddings": 32,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
        },
        # 4.x read text_config.tie_word_embeddings; 5.x reads only the top-level one: set both
        tie_word_embeddings=True,
        vision_feature_layers=[-1, 0, 3],
    )
    cfg = config_from_hub4(hub_cfg, None)  # plural key is read correctly by 5.x
    assert list(cfg.vision_feature_layer) == [-1, 0, 3]
    assert cfg.tie_word_embeddings
    model = build_model(cfg)
    randomize(model, seed=1004, store_dtype=torch.float32)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight, "not tied"

    sd = hub4_state_dict(model, torch.float32, with_position_ids=False)
    assert "language_model.lm_head.weight" not in sd
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_json(path / "config.json", hub_cfg)
    hub4_generation_config(path)

    ids, pv = make_inputs(seed=2004)
    assert ids.shape[1] > hub_cfg["text_config"]["max_position_embeddings"]
    ref = compute_reference(model, ids, pv)
    L = ids.shape[1]
    t = cfg.text_config
    dim = t.head_dim
    base = t.rope_parameters["rope_theta"] * ((2.0 * L / 32) - 1.0) ** (dim / (dim - 2))
    meta = {
        "key_layout": "hub4",
        "key_layout_detail": "language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*; "
        "no language_model.lm_head.weight (tied to language_model.model.embed_tokens.weight)",
        "config_dialect": "hub4",
        "dtype_on_disk": "float32",
        "weight_files": ["model.safetensors"],
        "vision_feature_layers_source": "plural vision_feature_layers (5.x maps it onto vision_feature_layer "
        "via attribute_map)",
        "tie_word_embeddings_read_from": "5.x: top-level config.tie_word_embeddings only "
        "(PreTrainedModel.get_expanded_tied_weights_keys reads self.config.tie_word_embeddings; "
        "text_config's is ignored); 4.x read text_config's. Both are true here.",
        "dynamic_rope": {
            "max_position_embeddings": 32,
            "seq_len": L,
            "effective_base": base,
            "formula": "base' = theta * (factor*seq_len/max_pos - (factor-1)) ** (d/(d-2)); "
            "inv_freq = 1/base'**(arange(0,d,2)/d); only when seq_len = max(position_ids)+1 > max_pos",
        },
        "logits_diff_if_rope_scaling_ignored": rope_sensitivity(model, ids, pv, ref["logits"]),
        "crosscheck_from_pretrained": crosscheck_from_pretrained(path, ref),
    }
    return write_reference(path, model, ref, meta)


def make_hub_7b_config(out: Path) -> dict:
    """Real 7B hub config (no weights) + parameter counts from a meta-device build."""
    path = fresh_dir(out / "hub-7b-config")
    write_json(path / "config.json", HUB_7B_CONFIG)

    def counts(hub_cfg):
        cfg = config_from_hub4(hub_cfg, DEFAULT_LAYERS)
        with torch.device("meta"):
            m = VipLlavaForConditionalGeneration(cfg)
        used, unused = num_parameters_used(m)
        unused_params = {
            p: sum(x.numel() for n, x in m.named_parameters() if n.startswith(p)) for p in unused
        }
        return {
            "num_parameters": m.num_parameters(),
            "num_parameters_used": used,
            "unused": unused_params,
            "projector_in_features": m.model.multi_modal_projector.linear_1.in_features,
        }

    c7 = counts(HUB_7B_CONFIG)
    hub13 = copy.deepcopy(HUB_7B_CONFIG)
    hub13["text_config"].update(
        _name_or_path="lmsys/vicuna-13b-v1.5",
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
    )
    c13 = counts(hub13)
    as_read = transformers_reads_as(HUB_7B_CONFIG)
    info = {
        "generated_by": "scripts/make_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "source": "llava-hf/vip-llava-7b-hf config.json (transformers 4.36.0.dev0), verbatim",
        "vision_feature_layers": DEFAULT_LAYERS,
        "vision_feature_layers_source": "no plural key; stray singular -2 ignored -> default five layers",
        "transformers_5x_reads_file_as": as_read,
        "vip_llava_7b": c7,
        "vip_llava_13b_reconstructed": dict(
            c13,
            text_config_assumed={"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                                 "num_attention_heads": 40, "vocab_size": 32064},
        ),
    }
    write_json(path / "reference.json", info)
    return info


# --------------------------------------------------------------------------------------------
# phase 2: tokenizer, processor files, images, generation / cached-decoding / template vectors
# --------------------------------------------------------------------------------------------

BASE_VOCAB = 500  # <unk> <s> </s>, 256 byte tokens, alphabet, merges
IMAGE_SIZE_PROC = VISION["image_size"]
TINY_FIXTURES = ["tiny-5x-f32", "tiny-hub-bf16-sharded", "tiny-gqa-f16", "tiny-hub-tied-dynamic"]
HUB4_FILESET = {"tiny-hub-bf16-sharded", "tiny-hub-tied-dynamic"}
MAX_NEW_TOKENS = 20
CACHED_STEPS = 8

# Training text for the tiny BPE (questions/answers about marked images, a few KB).
CORPUS = """\
###Human: What is inside the red rectangle?###Assistant: The red rectangle contains a small grey cat sitting on a wooden chair.
###Human: Describe the object within the green circle.###Assistant: It is a white cup of coffee on a saucer, next to a spoon.
###Human: What colour is the shape that the yellow arrow points at?###Assistant: The arrow points at a blue triangle near the window.
###Human: How many people are standing inside the purple box?###Assistant: There are two people standing inside the purple box.
###Human: What is the person in the orange ellipse holding?###Assistant: The person in the orange ellipse is holding a camera.
###Human: Is the square on the left brighter than the circle on the right?###Assistant: Yes, the square on the left is brighter.
###Human: What animal is marked by the red scribble?###Assistant: The red scribble marks a cat with green eyes and striped fur.
###Human: Which object is closest to the arrow tip?###Assistant: The closest object to the arrow tip is a silver spoon.
###Human: What is written on the sign inside the blue rectangle?###Assistant: The sign inside the blue rectangle says stop.
###Human: Describe the region covered by the mask.###Assistant: The masked region shows part of a sky with white clouds.
The image shows an astronaut in a white suit standing in front of a flag with red and white stripes.
A woman in a space suit smiles at the camera; behind her there is a model of a space shuttle.
A ginger cat with dark stripes looks to the right. Its eyes are green and its ears are pointed.
The cat is lying on a soft blanket, and the background is dark and out of focus.
A cup of coffee with milk foam sits on a saucer on a brown wooden table, with a spoon beside it.
The coffee is hot, the cup is white, and the saucer is round.
A man in a dark coat stands on a field holding a camera on a tripod. The photograph is black and white.
The picture is grey: there is no colour, only light and dark shades of grey.
Red, green, blue, yellow, orange, purple, pink, brown, black, white and grey are colours.
A circle is round. A square has four equal sides. A rectangle has four sides and four right angles.
A triangle has three sides. An ellipse looks like a stretched circle. An arrow points in one direction.
The red box is on the left, the green circle is in the middle, and the blue arrow is on the right.
The object at the top of the image is larger than the object at the bottom.
What is the colour of the car inside the box? The car inside the box is red.
Where is the dog in the picture? The dog is under the table, next to the green ball.
What is the man wearing? He is wearing a blue shirt and black trousers.
Can you see any text in the image? No, there is no visible text in the image.
How many cups are on the table? There are three cups on the table: one red, one white and one blue.
Is the light on or off? The light is on, and the room is bright.
What shape is drawn around the bird? A yellow circle is drawn around the bird.
Point 1 is at the top left corner and point 2 is at the bottom right corner of the image.
The first mark is a red dot, the second mark is a green dot, and the third mark is a blue dot.
Please describe the image in detail. The image shows a kitchen with a table, two chairs and a window.
Answer with one word: yes or no. Yes.
The visual prompt is a bounding box drawn on the image; the model must describe what is inside it.
Visual prompts can be boxes, circles, arrows, scribbles, masks, contours, points or triangles.
"""

# One question per image (10-20 words). The first four were picked (once, offline) from a small grid of
# wordings so that greedy decoding of every tiny fixture emits eos part-way for at least one image, with a
# top1-top2 logit margin >= 0.01 at every greedy step of every fixture (so f32 ports cannot flip a token).
IMAGE_QUESTIONS = {
    "astronaut": "What colour is the man near the yellow arrow, and is it bright or dark?",
    "chelsea": "What colour is the arrow inside the red rectangle, and is it large or small?",
    "coffee": "Can you tell me what is behind the arrow in this picture, and is it large or small?",
    "camera": "What colour is the cat inside the red rectangle, and is it bright or dark?",
    "chelsea_rgba": "Which part of this picture is transparent, and what animal can you see near the yellow arrow?",
    "coffee_wide": "How many objects are visible in this wide picture, and which one is closest to the left edge?",
}


_TOKENIZER_CACHE: dict = {}


def build_tokenizer():
    """Llama-style SentencePiece-BPE: trained with `tokenizers`, wrapped in transformers 5.x LlamaTokenizer."""
    if "tok" in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE["tok"]
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # train on "▁word" units (as sentencepiece does); runtime uses Llama's split=False Metaspace
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS.splitlines(), trainer)
    trained = json.loads(trainer_tok.to_str())
    vocab = trained["model"]["vocab"]
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["model"]["merges"]]
    assert len(vocab) == BASE_VOCAB, f"BPE trainer produced {len(vocab)} tokens (corpus too small?)"
    assert not any(x in t for t in vocab for x in ("<image>", "<pad>", "<s>", "</s>") if t not in specials)
    assert [vocab[s] for s in specials] == list(range(len(specials)))

    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, BOS, EOS, IMAGE_TOKEN, PAD_TOKEN]
    assert len(tok) == BASE_VOCAB + 2
    _TOKENIZER_CACHE["tok"] = tok
    return tok


def build_processor():
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE_PROC},
        crop_size={"height": IMAGE_SIZE_PROC, "width": IMAGE_SIZE_PROC},
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def write_processor_files_5x(path: Path) -> list[str]:
    """What `LlavaProcessor.save_pretrained` writes in transformers 5.x."""
    before = set(os.listdir(path))
    build_processor().save_pretrained(str(path))
    return sorted(set(os.listdir(path)) - before)


def write_processor_files_hub4(path: Path) -> list[str]:
    """The file set of the llava-hf hub repos written by transformers 4.x: preprocessor_config.json,
    processor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json (no chat_template),
    special_tokens_map.json."""
    tok = build_tokenizer()
    write_json(path / "preprocessor_config.json", clip_preprocessor_config(IMAGE_SIZE_PROC))
    write_json(path / "processor_config.json", llava_processor_config(VISION["patch_size"]))
    write_json(path / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    # the same tokenizers serialization as the 5.x set (for model_type vipllava, transformers 5.x loads it as
    # TokenizersBackend, i.e. exactly as the file says; see tokenizer_vectors)
    tok.backend_tokenizer.save(str(path / "tokenizer.json"))
    write_hub4_tokenizer_config(path)
    return ["chat_template.json", "preprocessor_config.json", "processor_config.json", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json"]


def write_hub4_tokenizer_config(path: Path) -> None:
    """tokenizer_config.json + special_tokens_map.json as transformers 4.3x wrote them for llava-hf repos."""
    added = {str(i): added_token_json(t) for i, t in [(0, "<unk>"), (BOS, "<s>"), (EOS, "</s>"),
                                                       (IMAGE_TOKEN, "<image>"), (PAD_TOKEN, "<pad>")]}
    write_json(
        path / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<pad>",
            "padding_side": "left",
            "processor_class": "LlavaProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "trust_remote_code": False,
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    tokd = {"pad_token": "<pad>"}
    for key, content in [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")]:
        tokd[key] = {k: v for k, v in added_token_json(content).items() if k != "special"}
    write_json(path / "special_tokens_map.json", tokd)


# ---- images -------------------------------------------------------------------------------------


def _downsize(img, max_side: int = 160):
    from PIL import Image

    w, h = img.size
    s = max_side / max(w, h)
    if s >= 1:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def make_images(out: Path) -> dict:
    """Write the test images (PNG) and return {name: info}; the PNGs are the inputs for Python and Rust."""
    import numpy as np
    import skimage
    import skimage.data as skd
    from PIL import Image

    d = out / "images"
    d.mkdir(parents=True, exist_ok=True)
    imgs = {
        "astronaut": (Image.fromarray(skd.astronaut()), "skimage.data.astronaut()"),
        "chelsea": (Image.fromarray(skd.chelsea()), "skimage.data.chelsea()"),
        "coffee": (Image.fromarray(skd.coffee()), "skimage.data.coffee()"),
        "camera": (Image.fromarray(skd.camera()), "skimage.data.camera() (8-bit grayscale, PNG mode L)"),
    }
    # RGBA with real transparency: chelsea, alpha falls off left->right (255 .. 0) and a fully transparent
    # disc in the upper-left quarter
    c = skd.chelsea()
    h, w = c.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.round(255.0 * (1.0 - xx / (w - 1))).astype(np.uint8)
    alpha[(yy - h // 4) ** 2 + (xx - w // 4) ** 2 < (h // 6) ** 2] = 0
    imgs["chelsea_rgba"] = (
        Image.fromarray(np.dstack([c, alpha])),
        "skimage.data.chelsea() + alpha gradient 255->0 (left->right) + transparent disc (PNG mode RGBA)",
    )
    # non-square 3:1: a 600x200 band of coffee (rows 100..300) -> 160x53 (upsampled by the processor)
    imgs["coffee_wide"] = (Image.fromarray(skd.coffee()[100:300, :, :]), "skimage.data.coffee()[100:300] (3:1)")

    info = {}
    for name, (img, source) in imgs.items():
        small = _downsize(img)
        fn = d / f"{name}.png"
        small.save(str(fn), format="PNG")
        info[name] = {
            "file": f"images/{name}.png",
            "source": source + f", downsized with PIL LANCZOS to long side 160 (skimage {skimage.__version__})",
            "original_size_wh": list(img.size),
            "size_wh": list(small.size),
            "mode": small.mode,
        }
    return info


def open_image(out: Path, name: str):
    from PIL import Image

    img = Image.open(str(out / "images" / f"{name}.png"))
    img.load()
    return img


def render_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reset_rope_state(model) -> None:
    """Dynamic rope in transformers is stateful (inv_freq grows with the longest sequence seen and only resets
    below max_position_embeddings). Put it back to the state of a freshly loaded model before each run."""
    rot = model.model.language_model.rotary_emb
    rot.inv_freq = rot.original_inv_freq.clone()
    rot.max_seq_len_cached = rot.original_max_seq_len


def _tensor_summary(tensors: dict) -> dict:
    """{name: {shape, dtype}} of a safetensors file's tensors, sorted by name."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in sorted(tensors.items())}


GEN_KEYS = ["do_sample", "num_beams", "max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id",
            "temperature", "top_k", "top_p", "repetition_penalty", "use_cache"]


@torch.no_grad()
def generation_reference(path: Path, out: Path, model, pixel_values_shared: dict, shared_inputs: dict) -> dict:
    from transformers import GenerationConfig

    processor = load_processor(path)
    tok = processor.tokenizer
    gen_cfg = GenerationConfig.from_pretrained(str(path))
    tensors, per_image = {}, {}
    for name, question in IMAGE_QUESTIONS.items():
        prompt = render_prompt(processor, question)
        inputs = processor(text=prompt, images=open_image(out, name), return_tensors="pt")
        assert torch.equal(inputs["pixel_values"], pixel_values_shared[name]), f"{path.name}/{name}: pixel_values differ"
        assert prompt == shared_inputs[name]["prompt"]
        assert inputs["input_ids"][0].tolist() == shared_inputs[name]["input_ids"], f"{path.name}/{name}: input_ids"
        ids, pv = inputs["input_ids"], inputs["pixel_values"].float()

        reset_rope_state(model)
        logits = model(input_ids=ids, pixel_values=pv, use_cache=False).logits
        last = logits[:, -1, :].float().clone()

        reset_rope_state(model)
        gen = model.generate(
            input_ids=ids,
            attention_mask=inputs["attention_mask"],
            pixel_values=pv,
            generation_config=gen_cfg,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new_ids = gen.sequences[0, ids.shape[1]:].clone()
        scores = torch.stack([s[0] for s in gen.scores])  # [n, vocab]
        margins = _margins(scores)
        tensors[f"input_ids.{name}"] = ids.clone()
        tensors[f"logits_last.{name}"] = last
        tensors[f"generated_ids.{name}"] = new_ids.unsqueeze(0).to(torch.int64)
        gl = new_ids.tolist()
        per_image[name] = {
            "image": f"images/{name}.png",
            "question": question,
            "prompt": prompt,
            "input_ids": ids[0].tolist(),
            "num_prompt_tokens": ids.shape[1],
            "generated_ids": gl,
            "num_generated": len(gl),
            "stopped_at_eos": bool(len(gl) < MAX_NEW_TOKENS and gl and gl[-1] == EOS),
            "text": tok.decode(gl, skip_special_tokens=True),
            "text_with_special": tok.decode(gl, skip_special_tokens=False),
            "greedy_min_top2_margin": min(margins),
            "first_step_score_vs_logits_last_max_abs_diff": float((scores[0] - last[0]).abs().max()),
            "argmax_logits_last": int(last[0].argmax()),
        }
    used = {k: getattr(gen_cfg, k, None) for k in GEN_KEYS}
    used.update(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    used["note"] = ("None = unset in generation_config.json and not applied: greedy search (num_beams 1), no "
                    "temperature/top-k/top-p/repetition processors; generation stops after emitting eos_token_id "
                    "(the eos is included in generated_ids) or after max_new_tokens")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "generation_reference.safetensors"),
              metadata={"format": "pt"})
    info = {
        "fixture": path.name,
        "generated_by": "scripts/make_fixtures.py (phase 2)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "processor_files": "hub4" if path.name in HUB4_FILESET else "hf5",
        "processor_loaded_with": "AutoProcessor.from_pretrained(dir, backend='pil') -> "
        + f"{type(processor).__name__}({type(processor.image_processor).__name__}, {type(tok).__name__})",
        "model": "the in-memory f32 model of phase 1 (weights rounded to the file dtype), eval, sdpa attention; "
        "dynamic-rope state reset to that of a freshly loaded model before every forward/generate",
        "generation_config_file": json.loads((path / "generation_config.json").read_text()),
        "generation_settings_used": used,
        "generate_call": "model.generate(input_ids, attention_mask, pixel_values, "
        "generation_config=GenerationConfig.from_pretrained(dir), max_new_tokens=20, do_sample=False)",
        "images": per_image,
        "tensors": _tensor_summary(tensors),
        "notes": {
            "logits_last.<image>": "f32 logits at the last prompt position, one forward without cache",
            "generated_ids.<image>": "new tokens only (prompt excluded); stops early when eos (2) is produced",
            "text": "tokenizer.decode(generated_ids, skip_special_tokens=True)",
            "greedy_min_top2_margin": "smallest top1-top2 logit gap over the greedy steps (ties break greedy ports)",
        },
    }
    write_json(path / "generation_reference.json", info)
    return info


@torch.no_grad()
def cached_reference(path: Path, model) -> dict:
    """Prefill L-8 tokens of the phase-1 input (with pixel_values), then 8 single-token steps with the cache."""
    from safetensors.torch import load_file

    ref = load_file(str(path / "reference.safetensors"))
    ids, pv = ref["input_ids"], ref["pixel_values"]
    L = ids.shape[1]
    P = L - CACHED_STEPS
    assert (ids[0, P:] != IMAGE_TOKEN).all(), "image tokens must all be in the prefill"
    reset_rope_state(model)
    out = model(input_ids=ids[:, :P], pixel_values=pv, use_cache=True)
    past = out.cache
    prefill_last = out.logits[:, -1, :].float().clone()
    inv_freq_prefill = model.model.language_model.rotary_emb.inv_freq.float().clone()
    steps = []
    for i in range(CACHED_STEPS):
        o = model(input_ids=ids[:, P + i : P + i + 1], cache=past, use_cache=True)
        past = o.cache
        steps.append(o.logits[0, -1, :].float().clone())
    step_logits = torch.stack(steps)
    inv_freq_last = model.model.language_model.rotary_emb.inv_freq.float().clone()
    reset_rope_state(model)
    tensors = {
        "cached_step_logits": step_logits.contiguous(),
        "cached_prefill_logits_last": prefill_last.contiguous(),
        "cached_step_input_ids": ids[0, P:].clone().contiguous(),
        "rope_inv_freq_after_prefill": inv_freq_prefill.contiguous(),
        "rope_inv_freq_after_last_step": inv_freq_last.contiguous(),
    }
    save_file(tensors, str(path / "cached_reference.safetensors"), metadata={"format": "pt"})
    full = ref["logits"][0]
    info = {
        "fixture": path.name,
        "inputs": "input_ids / pixel_values of reference.safetensors",
        "prefill_len": P,
        "num_steps": CACHED_STEPS,
        "positions_of_steps": list(range(P, L)),
        "max_abs_diff_vs_full_forward_logits": float((step_logits - full[P:]).abs().max()),
        "prefill_last_max_abs_diff_vs_full_forward": float((prefill_last[0] - full[P - 1]).abs().max()),
        "tensors": _tensor_summary(tensors),
        "notes": "model(input_ids[:, :P], pixel_values, use_cache=True), then model(input_ids[:, P+i:P+i+1], "
        "cache=<returned cache>) for i in 0..8 (position P+i, no pixel_values); cached_step_logits[i] are the logits for position P+i. "
        "Rope state reset to a fresh model first. Dynamic rope (transformers semantics): inv_freq is recomputed "
        "for seq_len = max(position_ids)+1 whenever that exceeds the largest seq_len seen so far (starting at "
        "max_position_embeddings); keys already in the cache keep the rotation they were computed with, so cached "
        "decoding differs from a full forward.",
    }
    write_json(path / "cached_reference.json", info)
    return info


# --------------------------------------------------------------------------------------------
# phase 3: batched (left-padded) generation, multi-image prompt, multi-turn logits
# --------------------------------------------------------------------------------------------

# Three requests of clearly different lengths (3 / 13 / 28 words), one image each. Picked (once, offline) from a
# small grid of wordings so that in two fixtures one batched row stops at eos while the others run to
# max_new_tokens (tiny-gqa-f16: row 0; tiny-hub-tied-dynamic: row 1, batched run only), with a top1-top2 logit
# margin >= 0.01 at every greedy step of every batched and solo run.
BATCH_REQUESTS = [
    ("chelsea", "Why are these?"),
    ("coffee_wide", "What colour is the man near the right edge of this small picture?"),
    ("camera", "What is the man near the yellow arrow doing in this grey picture, and can you tell me what colour "
               "the sky behind him is in the image?"),
]
MULTI_IMAGE = (["astronaut", "coffee"], "Compare the two pictures.")
MULTI_IMAGE_NEW_TOKENS = 10
MULTI_TURN_IMAGE = "chelsea"
MULTI_TURN_MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
]


def _greedy(model, gen_cfg, max_new_tokens: int, **inputs):
    """model.generate (greedy) -> (sequences [B, L+n], scores [n, B, vocab])."""
    reset_rope_state(model)
    gen = model.generate(
        **inputs,
        generation_config=gen_cfg,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    reset_rope_state(model)
    return gen.sequences, torch.stack(gen.scores)


def _truncate_at_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(EOS) + 1] if EOS in ids else list(ids)


def _margins(scores_row: torch.Tensor) -> list[float]:
    """top1 - top2 logit gap per step, scores_row [n, vocab]."""
    top2 = scores_row.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


@torch.no_grad()
def batch_reference(path: Path, out: Path, model, pixel_values_shared: dict) -> dict:
    from transformers import GenerationConfig

    processor = load_processor(path)
    tok = processor.tokenizer
    gen_cfg = GenerationConfig.from_pretrained(str(path))
    default_padding_side = tok.padding_side
    tok.padding_side = "left"
    tensors = {}

    # ---- 1. batched greedy generation with left padding ----------------------------------------
    names = [n for n, _ in BATCH_REQUESTS]
    questions = [q for _, q in BATCH_REQUESTS]
    prompts = [render_prompt(processor, q) for q in questions]
    images = [open_image(out, n) for n in names]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    B, L = ids.shape
    for i, n in enumerate(names):
        assert torch.equal(inputs["pixel_values"][i : i + 1], pixel_values_shared[n]), f"{path.name}: pixel_values {n}"
        n_pad = int((mask[i] == 0).sum())
        assert (mask[i, :n_pad] == 0).all() and (mask[i, n_pad:] == 1).all(), "expected left padding"
        assert (ids[i, :n_pad] == tok.pad_token_id).all() and ids[i, n_pad] == BOS
    # the position ids generate derives from the mask (GenerationMixin._prepare_position_ids_for_generation)
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)

    # one plain forward of the padded batch (what the first generate step sees, minus the cache)
    reset_rope_state(model)
    fwd = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"].float(),
                position_ids=position_ids, use_cache=False).logits
    batch_logits_last = fwd[:, -1, :].float().clone()
    # the same forward without position_ids: the model then uses 0..L-1 for every row, pads included
    reset_rope_state(model)
    fwd_nopos = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"].float(),
                      use_cache=False).logits[:, -1, :].float()
    nopos_diff = (fwd_nopos - batch_logits_last).abs().amax(dim=-1).tolist()

    seqs, scores = _greedy(model, gen_cfg, MAX_NEW_TOKENS, input_ids=ids, attention_mask=mask,
                           pixel_values=inputs["pixel_values"].float())
    raw_rows = seqs[:, L:].tolist()
    rows = []
    for i, (n, q, prompt) in enumerate(zip(names, questions, prompts)):
        gen_row = _truncate_at_eos(raw_rows[i])
        margins = _margins(scores[: len(gen_row), i, :])
        solo_in = processor(text=prompt, images=open_image(out, n), return_tensors="pt")
        solo_ids = solo_in["input_ids"]
        n_pad = int((mask[i] == 0).sum())
        assert torch.equal(solo_ids[0], ids[i, n_pad:]), "solo ids != unpadded batch row"
        solo_seqs, solo_scores = _greedy(model, gen_cfg, MAX_NEW_TOKENS, input_ids=solo_ids,
                                         attention_mask=solo_in["attention_mask"],
                                         pixel_values=solo_in["pixel_values"].float())
        solo = solo_seqs[0, solo_ids.shape[1]:].tolist()
        k = min(len(solo), len(gen_row))
        rows.append({
            "image": f"images/{n}.png",
            "question": q,
            "num_question_words": len(q.split()),
            "prompt": prompt,
            "num_prompt_tokens": solo_ids.shape[1],
            "num_left_pad": n_pad,
            "generated_ids": gen_row,
            "generated_ids_raw": raw_rows[i],
            "num_generated": len(gen_row),
            "stopped_at_eos": bool(gen_row and gen_row[-1] == EOS and len(gen_row) < MAX_NEW_TOKENS),
            "text": tok.decode(gen_row, skip_special_tokens=True),
            "solo_generated_ids": solo,
            "batched_equals_solo": gen_row == solo,
            "greedy_min_top2_margin_batched": min(margins),
            "greedy_top2_margins_batched": margins,
            "greedy_min_top2_margin_solo": min(_margins(solo_scores[:, 0, :])),
            "first_step_scores_batched_vs_solo_max_abs_diff": float((scores[0, i] - solo_scores[0, 0]).abs().max()),
            "scores_batched_vs_solo_max_abs_diff_common_prefix": (
                float((scores[:k, i] - solo_scores[:k, 0]).abs().max()) if gen_row[:k] == solo[:k] else None),
            "batch_logits_last_vs_first_step_score_max_abs_diff": float((batch_logits_last[i] - scores[0, i]).abs().max()),
            "batch_logits_last_if_position_ids_omitted_max_abs_diff": nopos_diff[i],
        })
    tensors["batch_input_ids"] = ids.clone()
    tensors["batch_attention_mask"] = mask.clone()
    tensors["batch_logits_last"] = batch_logits_last

    # ---- 2. one message with two images ------------------------------------------------------------
    mi_names, mi_q = MULTI_IMAGE
    mi_messages = [{"role": "user", "content": [{"type": "image"} for _ in mi_names] + [{"type": "text", "text": mi_q}]}]
    mi_prompt = processor.apply_chat_template(mi_messages, tokenize=False, add_generation_prompt=True)
    assert mi_prompt.count("<image>") == len(mi_names)
    mi_in = processor(text=mi_prompt, images=[open_image(out, n) for n in mi_names], return_tensors="pt")
    mi_ids, mi_pv = mi_in["input_ids"], mi_in["pixel_values"].float()
    assert mi_ids[0].tolist().count(IMAGE_TOKEN) == len(mi_names) * NUM_IMAGE_TOKENS
    for j, n in enumerate(mi_names):
        assert torch.equal(mi_pv[j : j + 1], pixel_values_shared[n])
    reset_rope_state(model)
    mi_logits_last = model(input_ids=mi_ids, pixel_values=mi_pv, use_cache=False).logits[:, -1, :].float().clone()
    mi_seqs, mi_scores = _greedy(model, gen_cfg, MULTI_IMAGE_NEW_TOKENS, input_ids=mi_ids,
                                 attention_mask=mi_in["attention_mask"], pixel_values=mi_pv)
    mi_gen = mi_seqs[0, mi_ids.shape[1]:].tolist()
    tensors["multi_image_logits_last"] = mi_logits_last

    # ---- 3. multi-turn conversation: one full forward -----------------------------------------------
    mt_prompt = processor.apply_chat_template(copy.deepcopy(MULTI_TURN_MESSAGES), tokenize=False,
                                              add_generation_prompt=True)
    mt_in = processor(text=mt_prompt, images=open_image(out, MULTI_TURN_IMAGE), return_tensors="pt")
    mt_ids = mt_in["input_ids"]
    assert torch.equal(mt_in["pixel_values"], pixel_values_shared[MULTI_TURN_IMAGE])
    reset_rope_state(model)
    mt_logits_last = model(input_ids=mt_ids, pixel_values=mt_in["pixel_values"].float(),
                           use_cache=False).logits[:, -1, :].float().clone()
    tensors["multi_turn_logits_last"] = mt_logits_last
    # earlier stages of the same conversation (for cache-reuse tests): are their ids a prefix of the full ids?
    stages = []
    for desc, msgs, agp in (
        ("first user turn + generation prompt", MULTI_TURN_MESSAGES[:1], True),
        ("first user turn + assistant answer", MULTI_TURN_MESSAGES[:2], False),
    ):
        p = processor.apply_chat_template(copy.deepcopy(msgs), tokenize=False, add_generation_prompt=agp)
        s_ids = processor(text=p, images=open_image(out, MULTI_TURN_IMAGE), return_tensors="pt")["input_ids"][0].tolist()
        stages.append({"description": desc, "messages": copy.deepcopy(msgs), "add_generation_prompt": agp,
                       "rendered": p, "input_ids": s_ids,
                       "is_prefix_of_full_input_ids": mt_ids[0].tolist()[: len(s_ids)] == s_ids,
                       "rendered_is_prefix_of_full_prompt": mt_prompt.startswith(p)})

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path / "batch_reference.safetensors"), metadata={"format": "pt"})
    eos_rows = [i for i, r in enumerate(rows) if r["stopped_at_eos"]]
    info = {
        "fixture": path.name,
        "generated_by": "scripts/make_fixtures.py (phase 3)",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "processor_files": "hub4" if path.name in HUB4_FILESET else "hf5",
        "model": "the in-memory f32 model of phase 1 (weights rounded to the file dtype), eval, sdpa attention; "
        "dynamic-rope state reset to that of a freshly loaded model before every forward/generate",
        "generation_config_file": json.loads((path / "generation_config.json").read_text()),
        "tensors": _tensor_summary(tensors),
        "batch": {
            "images": [f"images/{n}.png" for n in names],
            "questions": questions,
            "prompts": prompts,
            "tokenizer_padding_side_default": default_padding_side,
            "padding_side_used": tok.padding_side,
            "pad_token_id": tok.pad_token_id,
            "call": "tokenizer.padding_side = 'left'; processor(text=prompts, images=images, padding=True, "
            "return_tensors='pt'); model.generate(**inputs, generation_config=GenerationConfig.from_pretrained(dir), "
            "max_new_tokens=20, do_sample=False)",
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "position_ids": position_ids.tolist(),
            "pixel_values": "rows equal images/pixel_values.safetensors[<image>] (checked)",
            "rows": rows,
            "rows_stopped_at_eos": eos_rows,
            "all_batched_equal_solo": all(r["batched_equals_solo"] for r in rows),
            "generated_ids_raw_note": "sequences[:, L:] as generate returns them: generation runs until every row "
            "has produced eos (or max_new_tokens); a row that finished early is filled with pad_token_id",
            "notes": {
                "position_ids": "generate derives them from the mask: cumsum(mask)-1, 0 at pad positions; decode "
                "steps continue from the row's last position (so each row's positions match its solo run)",
                "batch_logits_last": "[3, 512] logits at the last (common) position of one forward of the padded "
                "batch with attention_mask and the position_ids above (= generate's first-step scores)",
                "batch_logits_last_if_position_ids_omitted_max_abs_diff": "how far the padded forward moves if "
                "position_ids are not passed (the model then uses 0..L-1 for every row, pads included): row-wise max "
                "abs diff against batch_logits_last. Only float noise: rope attention depends on position differences, "
                "so a per-row constant offset cancels (pad keys are masked), and max(position_ids), which dynamic rope "
                "scales with, is L-1 either way because the longest row has no padding",
                "solo": "each request generated alone (batch of 1, no padding), same settings",
                "greedy_top2_margins_batched": "top1-top2 logit gap at every greedy step of the batched run",
            },
        },
        "multi_image": {
            "images": [f"images/{n}.png" for n in mi_names],
            "messages": mi_messages,
            "prompt": mi_prompt,
            "input_ids": mi_ids[0].tolist(),
            "num_prompt_tokens": mi_ids.shape[1],
            "image_token_runs": _runs(mi_ids[0].tolist(), IMAGE_TOKEN),
            "pixel_values_shape": list(mi_pv.shape),
            "pixel_values": "row j equals images/pixel_values.safetensors[images[j]] (checked)",
            "generated_ids": mi_gen,
            "max_new_tokens": MULTI_IMAGE_NEW_TOKENS,
            "text": tok.decode(mi_gen, skip_special_tokens=True),
            "greedy_min_top2_margin": min(_margins(mi_scores[:, 0, :])),
            "argmax_logits_last": int(mi_logits_last[0].argmax()),
            "logits_last_top2_margin": _margins(mi_logits_last)[0],
            "first_step_score_vs_logits_last_max_abs_diff": float((mi_scores[0, 0] - mi_logits_last[0]).abs().max()),
            "notes": "processor(text=prompt, images=[img0, img1]); image features are scattered into the <image> "
            "positions in order (first 16 = images[0], next 16 = images[1]); multi_image_logits_last [1, 512] from "
            "one forward without cache",
        },
        "multi_turn": {
            "image": f"images/{MULTI_TURN_IMAGE}.png",
            "messages": copy.deepcopy(MULTI_TURN_MESSAGES),
            "add_generation_prompt": True,
            "prompt": mt_prompt,
            "input_ids": mt_ids[0].tolist(),
            "num_prompt_tokens": mt_ids.shape[1],
            "argmax_logits_last": int(mt_logits_last[0].argmax()),
            "logits_last_top2_margin": _margins(mt_logits_last)[0],
            "earlier_stages": stages,
            "notes": "multi_turn_logits_last [1, 512]: logits at the last position of one full forward without cache",
        },
    }
    write_json(path / "batch_reference.json", info)
    return info


def _runs(ids: list[int], token: int) -> list[list[int]]:
    """[start, length] of each run of `token` in ids."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append([i, j - i])
            i = j
        else:
            i += 1
    return runs


# ---- chat-template and tokenizer vectors --------------------------------------------------------

CHAT_CASES = [
    ("single user turn with image",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is inside the red box?"}]}], True),
    ("text-only user turn",
     [{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}], True),
    ("system + user (system text appears twice: first branch and the text loop)",
     [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}], True),
    ("multi-turn user/assistant/user",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "It is a cat."}]},
      {"role": "user", "content": [{"type": "text", "text": "What colour are its eyes?"}]}], True),
    ("two images in one message",
     [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                   {"type": "text", "text": "Compare the two pictures."}]}], True),
    ("image after text in content order (images are still rendered first)",
     [{"role": "user", "content": [{"type": "text", "text": "Look at this:"}, {"type": "image"},
                                   {"type": "text", "text": " what is in the circle?"}]}], True),
    ("add_generation_prompt false",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is inside the red box?"}]}],
     False),
    ("assistant message last",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A cup of coffee."}]}], False),
    ("assistant message last with add_generation_prompt true",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A cup of coffee."}]}], True),
    ("plain string content",
     [{"role": "user", "content": "What is inside the red box?"}], True),
    ("image given as url/path entry (type image with extra keys)",
     [{"role": "user", "content": [{"type": "image", "url": "images/chelsea.png"},
                                   {"type": "text", "text": "What is this?"}]}], True),
    ("other role name (title-cased by the template)",
     [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
      {"role": "tool", "content": [{"type": "text", "text": "42"}]}], True),
    ("empty conversation", [], True),
    ("newlines and unicode in text",
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Line one\nLine two café 🐱"}]}], True),
]


def chat_template_vectors(out: Path) -> list:
    processor = build_processor()
    vectors = []
    for desc, messages, agp in CHAT_CASES:
        entry = {"description": desc, "messages": copy.deepcopy(messages), "add_generation_prompt": agp}
        try:
            entry["rendered"] = processor.apply_chat_template(
                copy.deepcopy(messages), tokenize=False, add_generation_prompt=agp
            )
        except Exception as e:  # noqa: BLE001 - recorded
            entry["rendered"] = None
            entry["error"] = f"{type(e).__name__}: {e}"[:300]
        vectors.append(entry)
    write_json(out / "chat_template_vectors.json", vectors)
    return vectors


TOKENIZER_STRINGS = [
    "What is inside the red rectangle?",
    "hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces  between words",
    "   ",
    "",
    "line one\nline two\n\nline four",
    "\ttab and\r\ncarriage return",
    "###Human: <image>\nWhat is inside the red rectangle?###Assistant:",
    "###Human: <image>\n<image>\nCompare them.###Assistant: The first one.</s>",
    "café naïve résumé",
    "emoji 🐱👍🏽 end",
    "中文字符 and 日本語",
    "literal <image> and <pad> and <s> tokens",
    "<image>",
    "<pad><pad>",
    "UPPER lower MiXeD 12345 3.14 x=y+z; (a,b) [c] {d} \"quoted\" 'single' back\\slash",
    "Ünïcödé ẞ ﬁ Ω ½ → ✓",
]


# transformers <= 4.40's LlamaConverter pipeline (what 4.3x-era hub tokenizer.json files hold): the dummy prefix
# comes from a normalizer that runs on every text segment between added tokens; no pre-tokenizer
LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def _encode_vectors(tok, strings: list[str]) -> list[dict]:
    vectors = []
    for s in strings:
        ids = tok(s).input_ids
        vectors.append({
            "text": s,
            "input_ids": ids,
            "input_ids_no_special": tok(s, add_special_tokens=False).input_ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": tok.decode(ids, skip_special_tokens=False),
            "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
            # incremental (streaming) decode data: decode(ids[:k], skip_special_tokens=True) for k = 1..n
            "prefix_decodes_skip_special": [
                tok.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1)
            ],
        })
    return vectors


def _load_tokenizer_two_ways(files_dir: Path, scratch: Path):
    """AutoTokenizer on (a) a vipllava model directory (config.json present) and (b) a bare tokenizer directory.
    transformers 5.24 lists vipllava in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, so (a) ignores
    tokenizer_class and loads TokenizersBackend = the tokenizer.json pipeline as written; (b) honours
    tokenizer_class LlamaTokenizer, which keeps only vocab/merges/post-processor and rebuilds the pipeline."""
    from transformers import AutoTokenizer

    loaded = {}
    for kind in ("vipllava_dir", "bare_dir"):
        d = scratch / kind
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(files_dir, d)
        if kind == "vipllava_dir":
            write_json(d / "config.json", {"model_type": "vipllava"})
        loaded[kind] = AutoTokenizer.from_pretrained(str(d))
    shutil.rmtree(scratch)
    return loaded


def _pipeline(tok) -> dict:
    j = json.loads(tok.backend_tokenizer.to_str())
    return {k: j[k] for k in ("normalizer", "pre_tokenizer", "decoder", "post_processor")}


def tokenizer_vectors(out: Path) -> dict:
    from tokenizers import Tokenizer

    scratch = out / ".tokenizer_check"
    # the fixture tokenizer (identical tokenizer.json in all four tiny fixtures)
    files = scratch / "files"
    files.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(files))
    loaded = _load_tokenizer_two_ways(files, out / ".tokenizer_check2")
    shutil.rmtree(scratch)
    tok = loaded["vipllava_dir"]
    vectors = _encode_vectors(tok, TOKENIZER_STRINGS)
    assert vectors == _encode_vectors(loaded["bare_dir"], TOKENIZER_STRINGS), "load paths disagree"

    # ids the model can emit but the tokenizer lacks (502..511: vocab padded to 512), specials, raw bytes
    extra_ids = [[1, 505, 3, 4], [500, 501, 2, 0], [3 + 0xF0, 3 + 0x9F, 3 + 0x90],
                 [3 + 0xF0, 3 + 0x9F, 3 + 0x90, 3 + 0xB1]]
    decode_only = []
    for ids in extra_ids:
        entry = {"ids": ids}
        for key, skip in (("decode", False), ("decode_skip_special", True)):
            try:
                entry[key] = tok.decode(ids, skip_special_tokens=skip)
            except Exception as e:  # noqa: BLE001 - recorded
                entry[key] = None
                entry[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
        decode_only.append(entry)

    # the same vocabulary with a transformers-4.3x-style pipeline (tests/fixtures/tokenizer-legacy-4x/)
    legacy_dir = fresh_dir(out / "tokenizer-legacy-4x")
    j = json.loads(build_tokenizer().backend_tokenizer.to_str())
    j["normalizer"] = LEGACY_NORMALIZER
    j["pre_tokenizer"] = None
    write_json(legacy_dir / "tokenizer.json", j, sort_keys=False, ensure_ascii=False)
    write_hub4_tokenizer_config(legacy_dir)
    leg = _load_tokenizer_two_ways(legacy_dir, scratch)
    raw = Tokenizer.from_file(str(legacy_dir / "tokenizer.json"))
    legacy_strings = TOKENIZER_STRINGS + [render_prompt(build_processor(), q) for q in IMAGE_QUESTIONS.values()][:2]
    legacy_vectors = _encode_vectors(leg["vipllava_dir"], legacy_strings)
    for v in legacy_vectors:
        assert raw.encode(v["text"]).ids == v["input_ids"], "tokenizers file pipeline != transformers"
    bare_ids = [v["input_ids"] for v in _encode_vectors(leg["bare_dir"], legacy_strings)]
    fixture_ids = [v["input_ids"] for v in _encode_vectors(tok, legacy_strings)]
    for v, b, f in zip(legacy_vectors, bare_ids, fixture_ids):
        v["same_ids_as_fixture_tokenizer"] = v["input_ids"] == f
        v["input_ids_if_loaded_as_LlamaTokenizer"] = b

    info = {
        "generated_by": "scripts/make_fixtures.py (phase 2)",
        "transformers_version": transformers.__version__,
        "tokenizer": "the fixture tokenizer.json, loaded with AutoTokenizer.from_pretrained from a directory whose "
        f"config.json has model_type vipllava -> {type(tok).__name__}; a bare directory gives "
        f"{type(loaded['bare_dir']).__name__} (rebuilt Metaspace pipeline); both give identical vectors here",
        "vocab_size_base": tok.vocab_size,
        "len_with_added": len(tok),
        "special_ids": {"unk": tok.unk_token_id, "bos": tok.bos_token_id, "eos": tok.eos_token_id,
                        "pad": tok.pad_token_id, "image": tok.convert_tokens_to_ids("<image>")},
        "backend_pipeline": _pipeline(tok),
        "vectors": vectors,
        "decode_only": decode_only,
        "legacy_4x_pipeline": {
            "files": "tokenizer-legacy-4x/ (tokenizer.json = same vocab/merges/added tokens, normalizer "
            "Prepend('\u2581') + Replace(' ', '\u2581'), pre_tokenizer null; hub-4.x tokenizer_config.json)",
            "loaded_as": {k: type(v).__name__ for k, v in leg.items()},
            "note": "what transformers 5.24 does for a vipllava checkpoint whose tokenizer.json carries the old "
            "normalizer: it follows the file (TokenizersBackend), so every segment after an added token such as "
            "<image> gets its own dummy-prefix '\u2581'. Loaded as LlamaTokenizer (bare directory, or other "
            "model types) the normalizer is dropped and Metaspace(prepend_scheme='first') is used instead "
            "(input_ids_if_loaded_as_LlamaTokenizer). raw tokenizers.Tokenizer.from_file agrees with the "
            "vipllava path (checked).",
            "backend_pipeline": _pipeline(leg["vipllava_dir"]),
            "vectors": legacy_vectors,
        },
    }
    write_json(out / "tokenizer_vectors.json", info)
    return info


def make_shared_inputs(out: Path) -> tuple[dict, dict]:
    """images/*.png, images/pixel_values.safetensors, images/inputs.json (shared by every tiny fixture)."""
    img_info = make_images(out)
    processor = build_processor()
    pv, inputs_info = {}, {}
    for name, question in IMAGE_QUESTIONS.items():
        prompt = render_prompt(processor, question)
        enc = processor(text=prompt, images=open_image(out, name), return_tensors="pt")
        pv[name] = enc["pixel_values"].float().contiguous().clone()
        ids = enc["input_ids"][0].tolist()
        assert ids.count(IMAGE_TOKEN) == NUM_IMAGE_TOKENS and ids[0] == BOS
        inputs_info[name] = dict(img_info[name], question=question, prompt=prompt, input_ids=ids,
                                 num_image_tokens=ids.count(IMAGE_TOKEN),
                                 pixel_values_key=name)
    save_file(pv, str(out / "images" / "pixel_values.safetensors"), metadata={"format": "pt"})
    write_json(out / "images" / "inputs.json", {
        "generated_by": "scripts/make_fixtures.py (phase 2)",
        "transformers_version": transformers.__version__,
        "processor": "CLIPImageProcessorPil(size={shortest_edge: 56}, crop_size=56x56, resample=3 (bicubic), "
        "CLIP mean/std, do_convert_rgb) + LlavaProcessor(patch_size=14, 'default', num_additional_image_tokens=1)",
        "pixel_values": "images/pixel_values.safetensors, key = image name, [1, 3, 56, 56] f32; identical for the "
        "hf5 and hub4 processor file sets (checked)",
        "images": inputs_info,
    })
    return pv, inputs_info


def phase2_fixture(name: str, out: Path, shared) -> dict:
    path = out / name
    model = BUILT_MODELS[name]
    if name in HUB4_FILESET:
        files = write_processor_files_hub4(path)
    else:
        files = write_processor_files_5x(path)
    pv, inputs = shared
    g = generation_reference(path, out, model, pv, inputs)
    c = cached_reference(path, model)
    return {"processor_files": files, "generated": {k: v["num_generated"] for k, v in g["images"].items()},
            "stopped_at_eos": [k for k, v in g["images"].items() if v["stopped_at_eos"]],
            "cached_vs_full": c["max_abs_diff_vs_full_forward_logits"]}


FIXTURES = {
    "tiny-5x-f32": make_tiny_5x_f32,
    "tiny-hub-bf16-sharded": make_tiny_hub_bf16_sharded,
    "tiny-gqa-f16": make_tiny_gqa_f16,
    "tiny-hub-tied-dynamic": make_tiny_hub_tied_dynamic,
    "hub-7b-config": make_hub_7b_config,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: tests/fixtures)")
    ap.add_argument("--only", action="append", choices=sorted(FIXTURES), help="build only these fixtures")
    ap.add_argument("--no-phase2", action="store_true", help="only the checkpoints and reference.* (phase 1)")
    ap.add_argument("--no-phase3", action="store_true", help="skip batch_reference.* (phase 3)")
    args = ap.parse_args(argv)

    deterministic_torch()
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)

    names = args.only or list(FIXTURES)
    shared = None
    if not args.no_phase2:
        t0 = time.time()
        shared = make_shared_inputs(args.out)
        chat_template_vectors(args.out)
        tokenizer_vectors(args.out)
        log(f"shared (tokenizer, images, pixel_values, chat/tokenizer vectors): {time.time() - t0:.1f}s")
    for name in names:
        t0 = time.time()
        info = FIXTURES[name](args.out)
        summary = {k: info[k] for k in ("num_parameters", "max_abs_logit", "crosscheck_from_pretrained") if k in info}
        log(f"{name}: {time.time() - t0:.1f}s {json.dumps(summary)}")
        if shared is not None and name in TINY_FIXTURES:
            t0 = time.time()
            summary2 = phase2_fixture(name, args.out, shared)
            log(f"{name} phase 2: {time.time() - t0:.1f}s {json.dumps(summary2)}")
            if not args.no_phase3:
                t0 = time.time()
                b = batch_reference(args.out / name, args.out, BUILT_MODELS[name], shared[0])["batch"]
                summary3 = {"batched_equals_solo": [r["batched_equals_solo"] for r in b["rows"]],
                            "generated": [r["num_generated"] for r in b["rows"]],
                            "rows_stopped_at_eos": b["rows_stopped_at_eos"]}
                log(f"{name} phase 3: {time.time() - t0:.1f}s {json.dumps(summary3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
