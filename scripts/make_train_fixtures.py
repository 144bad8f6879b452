#!/usr/bin/env python3
"""Reference losses and gradients of fine-tuning, recorded with PyTorch/transformers.

Reads the tiny checkpoints made by ``make_fixtures.py`` (nothing is downloaded) and writes
``tests/fixtures/train/``::

    data.json                  4 LLaVA-format samples (single- and multi-turn, one with a system
                               turn) on the fixture images (paths relative to this file)
    bad.jsonl                  one good sample and three bad ones (missing image, no <image>, empty answer)
    reference.json             per fixture: the labelled input_ids/labels of every sample, the per-step
                               losses of plain SGD (batch 1, file order, several epochs) for
                               --trainable projector and --trainable all, the loss of samples 0 and 1
                               as one right-padded batch with an attention mask, and the settings used
    <fixture>_grads.safetensors  projector gradients of the first step (PyTorch layout: Linear weight
                               [out, in])

Labelling rule (the same as vipllava-train's, implemented independently here): the conversation is
rendered with the processor's chat template (add_generation_prompt=False; human->user, gpt->assistant,
system->system; `<image>` with one adjacent newline removed from the first human turn, the text trimmed,
and an image content entry put first), `<image>` is expanded to the image token count, the text is
tokenized with BOS and EOS is appended. A token is a target when its character span overlaps an
assistant message's text (found after the rendering of the messages before it); the appended EOS is a
target; image tokens and all others are -100. The loss is transformers' own (``labels=`` in forward).

Run from the repository root (same venv as make_fixtures.py)::

    .venv/bin/python scripts/make_train_fixtures.py

Check that transformers loads an export of ours and gives our logits: the Rust test
``export_round_trip_gives_the_merged_model_logits`` (train/tests/train/parity.rs) trains LoRA for three steps,
exports, and, when VIPLLAVA_EXPORT_CHECK_DIR is set, leaves the export there with
``rust_logits.safetensors`` (input_ids, pixel_values and the logits of our merged model)::

    VIPLLAVA_EXPORT_CHECK_DIR=/tmp/vipllava-export-check \
        cargo test -p vipllava-train --test train parity::export_round_trip
    .venv/bin/python scripts/make_train_fixtures.py --check-export /tmp/vipllava-export-check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import VipLlavaForConditionalGeneration

from common import REPO_ROOT, deterministic_torch, load_processor, write_json

FIXTURES = REPO_ROOT / "tests" / "fixtures"
OUT = FIXTURES / "train"

MODELS = ["tiny-5x-f32", "tiny-gqa-f16"]
EPOCHS = 3
LR = {"projector": 0.05, "all": 0.05}

SAMPLES = [
    {
        "id": "astronaut-1",
        "image": "../images/astronaut.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the red box?"},
            {"from": "gpt", "value": "A person in a white suit."},
        ],
    },
    {
        "id": "coffee-multi",
        "image": "../images/coffee.png",
        "conversations": [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A cup of coffee."},
            {"from": "human", "value": "What colour is the cup?"},
            {"from": "gpt", "value": "The cup is white and the coffee is brown."},
        ],
    },
    {
        "id": 3,
        "image": "../images/chelsea.png",
        "conversations": [
            {"from": "system", "value": "You are a helpful assistant. "},
            {"from": "human", "value": "<image>\nDescribe the animal."},
            {"from": "gpt", "value": "It is a cat with stripes."},
        ],
    },
    {
        "id": "camera-1",
        "image": "../images/camera.png",
        "conversations": [
            {"from": "human", "value": "<image> Who holds the camera?"},
            {"from": "gpt", "value": "A man in a dark coat."},
        ],
    },
]

BAD = [
    SAMPLES[0],
    {"id": "missing-image", "image": "../images/nope.png",
     "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
    {"id": "no-tag", "image": "../images/coffee.png",
     "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"id": "empty-answer", "image": "../images/coffee.png",
     "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "  "}]},
]


def strip_image_tag(value: str, tag: str = "<image>") -> str:
    if tag + "\n" in value:
        value = value.replace(tag + "\n", "", 1)
    elif "\n" + tag in value:
        value = value.replace("\n" + tag, "", 1)
    else:
        value = value.replace(tag, "", 1)
    return value.strip()


def to_messages(conversations):
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    first_human = next(i for i, t in enumerate(conversations) if t["from"] == "human")
    out = []
    for i, t in enumerate(conversations):
        if i == first_human:
            content = [{"type": "image"}, {"type": "text", "text": strip_image_tag(t["value"])}]
        else:
            content = [{"type": "text", "text": t["value"]}]
        out.append({"role": role[t["from"]], "content": content})
    return out


def encode(processor, sample):
    tok = processor.tokenizer
    messages = to_messages(sample["conversations"])

    def render(msgs):
        if not msgs:
            return ""
        return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)

    full = render(messages)
    image = Image.open(str(OUT / sample["image"]))
    image.load()
    batch = processor(images=image, text=full, return_tensors="pt")
    seq_len = int((batch["input_ids"] == processor.image_token_id).sum())
    expanded = full.replace("<image>", "<image>" * seq_len)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i])
        text = m["content"][0]["text"]
        start = full.index(text, len(prefix) if full.startswith(prefix) else 0)
        shift = full[:start].count("<image>") * len("<image>") * (seq_len - 1)
        spans.append((start + shift, start + shift + len(text)))
    enc = tok(expanded, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    assert ids == batch["input_ids"][0].tolist(), "processor and tokenizer disagree"
    labels = []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        target = tid != processor.image_token_id and any(s < b and a < e for a, b in spans)
        labels.append(tid if target else -100)
    ids.append(tok.eos_token_id)
    labels.append(tok.eos_token_id)
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "pixel_values": batch["pixel_values"].to(torch.float32),
        "rendered": full,
    }


def load(name):
    model = VipLlavaForConditionalGeneration.from_pretrained(str(FIXTURES / name), dtype=torch.float32)
    model.eval()  # no dropout in these configs; eval keeps it explicit
    return model


def set_trainable(model, trainable):
    for n, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or "multi_modal_projector" in n)


def run_sgd(name, encoded, trainable):
    torch.manual_seed(0)
    model = load(name)
    set_trainable(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR[trainable], momentum=0.0, weight_decay=0.0)
    losses, first_grads = [], None
    for _ in range(EPOCHS):
        for e in encoded:
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=e["input_ids"], pixel_values=e["pixel_values"], labels=e["labels"])
            out.loss.backward()
            if first_grads is None:
                first_grads = {
                    n: p.grad.detach().clone().contiguous()
                    for n, p in model.named_parameters()
                    if "multi_modal_projector" in n and p.grad is not None
                }
            losses.append(float(out.loss.detach()))
            opt.step()
    return losses, first_grads


@torch.no_grad()
def batch_loss(name, encoded, pad_id, rows):
    """Loss of several samples as one right-padded batch with an attention mask (mean over all targets)."""
    model = load(name)
    n = max(encoded[i]["input_ids"].shape[1] for i in rows)
    ids, labels, mask = [], [], []
    for i in rows:
        e = encoded[i]
        k = e["input_ids"].shape[1]
        ids.append(e["input_ids"][0].tolist() + [pad_id] * (n - k))
        labels.append(e["labels"][0].tolist() + [-100] * (n - k))
        mask.append([1] * k + [0] * (n - k))
    out = model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        pixel_values=torch.cat([encoded[i]["pixel_values"] for i in rows]),
        labels=torch.tensor(labels),
    )
    return float(out.loss)


def make():
    deterministic_torch()
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "data.json", SAMPLES, sort_keys=False)
    (OUT / "bad.jsonl").write_text("".join(json.dumps(s) + "\n" for s in BAD))
    import transformers

    ref = {
        "generated_by": "scripts/make_train_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "epochs": EPOCHS,
        "lr": LR,
        "optimizer": "SGD (no momentum, no weight decay), batch 1, file order",
        "models": {},
    }
    for name in MODELS:
        processor = load_processor(FIXTURES / name)
        encoded = [encode(processor, s) for s in SAMPLES]
        entry = {
            "samples": [
                {
                    "id": s["id"],
                    "rendered": e["rendered"],
                    "input_ids": e["input_ids"][0].tolist(),
                    "labels": e["labels"][0].tolist(),
                }
                for s, e in zip(SAMPLES, encoded)
            ],
        }
        entry["batch_loss_rows"] = [0, 1]
        entry["batch_loss"] = batch_loss(name, encoded, processor.tokenizer.pad_token_id, [0, 1])
        for trainable in ["projector", "all"]:
            losses, grads = run_sgd(name, encoded, trainable)
            entry[f"losses_{trainable}"] = losses
            if trainable == "projector":
                save_file({k.replace("model.", "", 1): v for k, v in grads.items()},
                          str(OUT / f"{name}_grads.safetensors"))
            print(f"{name} {trainable}: {losses[0]:.5f} -> {losses[-1]:.5f}")
        ref["models"][name] = entry
    write_json(OUT / "reference.json", ref, indent=1)


@torch.no_grad()
def check_export(path: Path):
    """Load an exported directory with transformers and compare its logits with ours."""
    ours = load_file(str(path / "rust_logits.safetensors"))
    model = VipLlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    out = model(input_ids=ours["input_ids"].to(torch.long), pixel_values=ours["pixel_values"])
    diff = (out.logits - ours["logits"]).abs().max().item()
    scale = ours["logits"].abs().max().item()
    print(json.dumps({"export": str(path), "max_abs_diff": diff, "max_abs_logit": scale}))
    assert diff <= 1e-4 * max(1.0, scale), f"logits differ by {diff}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-export", type=Path)
    args = ap.parse_args()
    if args.check_export:
        check_export(args.check_export)
    else:
        make()
