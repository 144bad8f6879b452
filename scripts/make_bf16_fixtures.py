#!/usr/bin/env python3
"""Record transformers' own bfloat16 run of each tiny fixture, for the precision tests.

The phase-1 references of ``make_fixtures.py`` are float32. A bf16 run of ours can only be
compared with them up to bf16's rounding, and on these tiny random models a greedy token can
flip where transformers' bf16 run flips it too. This script loads each committed fixture the
way a user would in bf16 (``from_pretrained(dir, dtype=torch.bfloat16)``: f16 and f32 files are
rounded to bf16 on load), asks the astronaut question of ``tests/fixtures/images/inputs.json``
and writes, next to the fixture's other references:

    bf16_reference.safetensors   logits_last [1, vocab] (the prefill's last position, as f32)
    bf16_reference.json          the 10 greedy tokens of generate() in bf16 (eos not applied),
                                 each step's gap between the two best logits, and, for
                                 comparison, the tokens in float32

Run from the repository root (a few seconds; same venv as make_fixtures.py)::

    .venv/bin/python scripts/make_bf16_fixtures.py

It only adds these two files per fixture; nothing else in ``tests/fixtures/`` changes.
"""

from __future__ import annotations

import json

from common import REPO_ROOT, load_processor, log, write_json
from make_fixtures import _margins, render_prompt

FIXTURES = ["tiny-5x-f32", "tiny-hub-bf16-sharded", "tiny-gqa-f16", "tiny-hub-tied-dynamic"]
NEW_TOKENS = 10
IMAGE = "astronaut"


def run(path, dtype, ids, pixel_values, kwargs):
    """(last-position logits as f32, greedy tokens, each step's top-2 margin) of a freshly loaded
    model in `dtype`; `kwargs`
    are the ones the fixture's own cross-check loads with (the hub 7B config's stray
    `vision_feature_layer` needs the default layers given back)."""
    import torch
    from transformers import GenerationConfig, VipLlavaForConditionalGeneration

    model = VipLlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    pv = pixel_values.to(dtype)
    with torch.no_grad():
        last = model(input_ids=ids, pixel_values=pv, use_cache=False).logits[:, -1, :].float().clone()
    # A fresh model again: dynamic NTK rope keeps state between calls.
    model = VipLlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, **kwargs).eval()
    gen_cfg = GenerationConfig.from_pretrained(str(path))
    gen_cfg.eos_token_id = None
    with torch.no_grad():
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pv,
            generation_config=gen_cfg,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    margins = _margins(torch.stack([s[0] for s in seq.scores]).float())
    return last, seq.sequences[0, ids.shape[1]:].tolist(), margins


def main() -> None:
    import PIL
    import safetensors.torch
    import torch
    import transformers
    from PIL import Image

    torch.manual_seed(0)
    torch.set_num_threads(1)
    fixtures = REPO_ROOT / "tests" / "fixtures"
    inputs = json.loads((fixtures / "images" / "inputs.json").read_text())["images"][IMAGE]
    image = Image.open(fixtures / inputs["file"])
    image.load()
    for name in FIXTURES:
        path = fixtures / name
        processor = load_processor(path)
        prompt = render_prompt(processor, inputs["question"])
        encoded = processor(text=prompt, images=image, return_tensors="pt")
        ids = encoded["input_ids"]
        assert ids[0].tolist() == inputs["input_ids"], f"{name}: input_ids differ from inputs.json"
        kwargs = json.loads((path / "reference.json").read_text())["crosscheck_from_pretrained"]["kwargs"]
        logits, tokens, margins = run(path, torch.bfloat16, ids, encoded["pixel_values"], kwargs)
        f32_logits, f32_tokens, _ = run(path, torch.float32, ids, encoded["pixel_values"], kwargs)
        same = next((i for i, (a, b) in enumerate(zip(tokens, f32_tokens)) if a != b), NEW_TOKENS)
        diff = (logits - f32_logits).abs().max().item()
        safetensors.torch.save_file({"logits_last": logits.contiguous()}, str(path / "bf16_reference.safetensors"))
        write_json(path / "bf16_reference.json", {
            "fixture": name,
            "generated_by": "scripts/make_bf16_fixtures.py",
            "image": IMAGE,
            "question": inputs["question"],
            "load": "VipLlavaForConditionalGeneration.from_pretrained(dir, dtype=torch.bfloat16, **kwargs), eval, "
                    "default (sdpa) attention, torch.set_num_threads(1)",
            "load_kwargs": kwargs,
            "generate": f"greedy, {NEW_TOKENS} new tokens, eos not applied, KV cache on",
            "bf16_tokens": tokens,
            "bf16_top2_margins": margins,
            "f32_tokens": f32_tokens,
            "bf16_tokens_equal_to_f32_leading": same,
            "bf16_vs_f32_logits_max_abs_diff": diff,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "pillow": PIL.__version__},
        })
        log(f"{name}: bf16 vs f32 logits max |diff| {diff:.4f}, leading greedy tokens equal {same}/{NEW_TOKENS}")


if __name__ == "__main__":
    main()
