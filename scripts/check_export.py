#!/usr/bin/env python3
"""Load an exported model directory (single file or sharded with an index) with transformers:
no missing or unexpected keys, and the logits recorded beside it by the Rust test.

    VIPLLAVA_SHARDED_EXPORT_CHECK_DIR=/tmp/vipllava-sharded-check \\
        cargo test -p vipllava-train --test train scale::sharded_export
    /path/to/venv/bin/python scripts/check_export.py /tmp/vipllava-sharded-check
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import VipLlavaForConditionalGeneration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path)
    args = ap.parse_args()
    model, info = VipLlavaForConditionalGeneration.from_pretrained(
        str(args.dir), dtype=torch.float32, output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading problems: {problems}"
    ours = load_file(str(args.dir / "rust_logits.safetensors"))
    with torch.no_grad():
        out = model(input_ids=ours["input_ids"].to(torch.long), pixel_values=ours["pixel_values"])
    diff = (out.logits - ours["logits"]).abs().max().item()
    scale = ours["logits"].abs().max().item()
    shards = sorted(p.name for p in args.dir.glob("*.safetensors") if p.name != "rust_logits.safetensors")
    print(json.dumps({"export": str(args.dir), "weight_files": shards, "max_abs_diff": diff,
                      "max_abs_logit": scale}))
    assert diff <= 1e-4 * max(1.0, scale), f"logits differ by {diff}"


if __name__ == "__main__":
    main()
