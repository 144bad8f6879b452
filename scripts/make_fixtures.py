#!/usr/bin/env python3
"""Regenerate the tiny VipLlava test checkpoints and their reference outputs.

Everything is built locally with random (seeded) weights; nothing is downloaded.
The outputs are committed under ``tests/fixtures/`` and read by the Rust tests.

Set-up (CPU only is enough)::

    python3 -m venv /work/venv
    /work/venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /work/venv/bin/pip install "transformers>=5,<6" safetensors numpy pillow tokenizers

Run (from the repository root; about 30 s on 2 cores)::

    /work/venv/bin/python scripts/make_fixtures.py            # writes tests/fixtures/
    /work/venv/bin/python scripts/make_fixtures.py --out /tmp/fx --only tiny-gqa-f16

Re-running with the same torch/transformers versions rewrites byte-identical
files (fixed seeds, one CPU thread, sorted JSON).

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

Extending (phase 2: tokenizer/processor/chat template/image inputs): add a function
that takes a fixture directory and writes the extra files, and call it from the
corresponding ``make_*`` function, or add a new entry to ``FIXTURES``.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

DEFAULT_LAYERS = [-2, -5, -8, -11, 6]
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


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


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
    hub_cfg = {
        "architectures": ["VipLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN,
        "model_type": "vipllava",
        "pad_token_id": PAD_TOKEN,
        "projector_hidden_act": "gelu",
        "projector_layernorm": False,
        "projector_layernorm_eps": 1e-05,
        "text_config": {
            # no rms_norm_eps / rope_theta / hidden_act / max_position_embeddings: LlamaConfig defaults
            "_name_or_path": "lmsys/vicuna-tiny",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": TEXT["hidden_size"],
            "intermediate_size": TEXT["intermediate_size"],
            "model_type": "llama",
            "num_attention_heads": TEXT["num_attention_heads"],
            "num_hidden_layers": TEXT["num_hidden_layers"],
            "pad_token_id": 0,
            "rope_scaling": {"factor": 2.0, "type": "linear"},
            "torch_dtype": "bfloat16",
            "vocab_size": VOCAB,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": HUB4_VERSION,
        "vision_config": vision_config_hub4(12),
        "vision_feature_layer": -2,  # stray LLaVA key, as in the real 7B hub config
        "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB,
    }
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
    hub_cfg = {
        "architectures": ["VipLlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": IMAGE_TOKEN,
        "model_type": "vipllava",
        "pad_token_id": PAD_TOKEN,
        "projector_hidden_act": "gelu",
        "projector_layernorm_eps": 1e-05,
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": TEXT["hidden_size"],
            "intermediate_size": TEXT["intermediate_size"],
            "max_position_embeddings": 32,
            "model_type": "llama",
            "num_attention_heads": TEXT["num_attention_heads"],
            "num_hidden_layers": TEXT["num_hidden_layers"],
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "vocab_size": VOCAB,
        },
        # 4.x read text_config.tie_word_embeddings; 5.x reads only the top-level one: set both
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": HUB4_VERSION,
        "vision_config": vision_config_hub4(4),
        "vision_feature_layers": [-1, 0, 3],
        "vocab_size": VOCAB,
    }
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
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # reproducible reductions
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)

    for name in args.only or list(FIXTURES):
        t0 = time.time()
        info = FIXTURES[name](args.out)
        summary = {k: info[k] for k in ("num_parameters", "max_abs_logit", "crosscheck_from_pretrained") if k in info}
        log(f"{name}: {time.time() - t0:.1f}s {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
