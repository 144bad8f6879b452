#!/usr/bin/env python3
"""The PyTorch side of the CPU benchmark: transformers' VipLlavaForConditionalGeneration on the
checkpoint written by scripts/make_bench_checkpoint.py, same inputs as `vipllava bench --image`.

Both sides: 2 threads, the scikit-image astronaut photo (CLIP-336 crop), BOS + 576 image tokens +
40 text ids (no tokenizer: random vocabulary), one prefill with logits of the last position only,
then greedy decoding to 32 new tokens with the KV cache. Each figure is the median over
`--repeats` runs after one untimed warm-up.

    .venv/bin/python scripts/bench_pytorch.py --model bench-data/clip-l-llama-1b-f32 \
        --image bench-data/astronaut.png --dtype f32 --repeats 3 --json

Prints one JSON object (with --json) with the same field names as `vipllava bench --json`.

Driver (interleaves the two sides, one process per run, and prints the ratios us/PyTorch; with
`--model DIR` both sides run that one checkpoint in every dtype instead of
`--model-dir`/clip-l-llama-1b-<dtype>, e.g. the 7B of make_random_checkpoint.py, whose hub config's
stray `vision_feature_layer` the PyTorch side overrides with the five default layers):

    .venv/bin/python scripts/bench_pytorch.py --compare --vipllava target/release/vipllava \
        --model-dir bench-data --image bench-data/astronaut.png --dtypes f32,bf16,q8 \
        --rounds 2 --repeats 1

`q8` in --dtypes runs our f32 model with int8 linear weights (`--quantize q8`) against PyTorch
in f32.

It runs, per dtype and round: vipllava, then PyTorch; reports per side the median over rounds of
each figure, the ratio us/PyTorch, the measured read bandwidth (2 threads summing a 1 GiB
buffer) and the decode bound: read bandwidth / bytes of the weights one decode step streams
(every decoder matrix and lm_head).
"""

import argparse
import json
import statistics
import time

T_START = time.time()

import torch  # noqa: E402

from common import bench_prompt_ids, hub_config_overrides, log, torch_dtype  # noqa: E402


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def read_bandwidth_gbs(threads, gib=1.0, repeats=5):
    """Read bandwidth: `threads` torch threads summing a buffer much larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def decode_weight_bytes(config_path, dtype):
    """Bytes one decode step streams: every decoder layer's matrices and norms, the final norm and
    lm_head (the embedding is a row lookup)."""
    from transformers import LlamaConfig

    with open(config_path) as f:
        written = json.load(f)["text_config"]
    # The 7B hub config leaves most of text_config to LlamaConfig's defaults (hidden 4096, 32
    # layers, ...): resolved by transformers itself, derived fields (head_dim, kv heads) included.
    c = LlamaConfig(**written).to_dict()
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    matrices = layers * (h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter)
    rest = layers * 2 * h + h + h * c["vocab_size"]  # norms, final norm, lm_head
    if dtype == "q8":
        # vipllava --dtype f32 --quantize q8: int8 matrices with one f32 scale per 32 values;
        # norms and lm_head stay f32
        return matrices * (1 + 4 / 32) + rest * 4
    return (matrices + rest) * {"f32": 4, "bf16": 2, "f16": 2}[dtype]


def compare(args):
    import subprocess
    import os

    results = {}
    # Each entry: (label, our dtype, our extra flags, PyTorch dtype). "q8" is our f32 model with
    # int8 linear weights, compared with PyTorch in f32 (the q8 target).
    variants = []
    for dtype in args.dtypes.split(","):
        if dtype == "q8":
            variants.append(("q8", "f32", ["--quantize", "q8"], "f32"))
        else:
            variants.append((dtype, dtype, [], dtype))
    for label, dtype, extra, torch_dtype in variants:
        # `--model` compares on that one checkpoint in every dtype (e.g. the 7B architecture
        # from make_random_checkpoint.py); otherwise the bench checkpoint stored in each dtype.
        # f16 reads the f32 files (rounded at load on both sides), as bench_llamacpp.py does.
        stored = "f32" if dtype == "f16" else dtype
        model = args.model or os.path.join(args.model_dir, f"clip-l-llama-1b-{stored}")
        runs = {"vipllava": [], "pytorch": []}
        for r in range(args.rounds):
            ours = [args.vipllava, "bench", "--model", model, "--image", args.image, "--dtype", dtype,
                    *extra, "--batch-sizes", "1", "--text-tokens", str(args.text_tokens), "--new-tokens",
                    str(args.new_tokens), "--repeats", str(args.repeats), "--json"]
            theirs = [__import__("sys").executable, os.path.abspath(__file__), "--model", model, "--image",
                      args.image, "--dtype", torch_dtype, "--threads", str(args.threads), "--text-tokens",
                      str(args.text_tokens), "--new-tokens", str(args.new_tokens), "--repeats",
                      str(args.repeats), "--json"]
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            for side, cmd in (("vipllava", ours), ("pytorch", theirs)):
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                row = json.loads(out.strip().splitlines()[-1])
                log(f"[{label} round {r}] {side}: " + json.dumps({k: row[k] for k in FIELDS}))
                runs[side].append(row)
        med = {side: {k: statistics.median(x[k] for x in rows) for k in FIELDS} for side, rows in runs.items()}
        ratio = {k: med["vipllava"][k] / med["pytorch"][k] for k in FIELDS}
        same = runs["vipllava"][-1]["tokens"] == runs["pytorch"][-1]["tokens"]
        results[label] = {"vipllava": med["vipllava"], "pytorch": med["pytorch"], "ratio": ratio,
                          "pytorch_dtype": torch_dtype, "same_greedy_tokens": same,
                          "weight_bytes_per_decode_step": decode_weight_bytes(os.path.join(model, "config.json"), label)}
    bw = read_bandwidth_gbs(args.threads)
    for dtype, r in results.items():
        bound = bw * 1e9 / r["weight_bytes_per_decode_step"]
        r["read_bandwidth_gbs"] = bw
        r["decode_bound_tokens_per_s"] = bound
        r["decode_fraction_of_bound"] = {s: r[s]["decode_tokens_per_s"] / bound for s in ("vipllava", "pytorch")}
    print(json.dumps(results, indent=2))
    print("| dtype | figure | vipllava | PyTorch | us/PyTorch |")
    print("|---|---|---|---|---|")
    for dtype, r in results.items():
        for k in FIELDS:
            print(f"| {dtype} | {k} | {r['vipllava'][k]:.1f} | {r['pytorch'][k]:.1f} | {r['ratio'][k]:.2f} |")
        print(f"| {dtype} | decode bound tokens/s ({r['read_bandwidth_gbs']:.1f} GB/s / "
              f"{r['weight_bytes_per_decode_step'] / 1e9:.2f} GB) | "
              f"{r['decode_fraction_of_bound']['vipllava'] * 100:.0f}% | "
              f"{r['decode_fraction_of_bound']['pytorch'] * 100:.0f}% | {r['decode_bound_tokens_per_s']:.1f} |")


FIELDS = ["load_ms", "image_encode_ms", "prefill_ms", "decode_tokens_per_s", "peak_rss_mb"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--image", required=True)
    ap.add_argument("--compare", action="store_true", help="run the interleaved comparison driver")
    ap.add_argument("--vipllava", default="target/release/vipllava")
    ap.add_argument("--model-dir", default="bench-data")
    ap.add_argument("--dtypes", default="f32,bf16", help="f32, bf16, f16 and/or q8 (ours q8 vs PyTorch f32)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' default, sdpa)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.compare:
        return compare(args)

    torch.set_num_threads(args.threads)
    from PIL import Image
    from transformers import CLIPImageProcessorPil, VipLlavaForConditionalGeneration

    dtype = torch_dtype(args.dtype)
    t0 = time.time()
    kwargs = {"dtype": dtype, **hub_config_overrides(args.model)}
    if args.attn:
        kwargs["attn_implementation"] = args.attn
    model = VipLlavaForConditionalGeneration.from_pretrained(args.model, **kwargs).eval()
    load_ms = (time.time() - t0) * 1000.0
    config = model.config

    processor = CLIPImageProcessorPil.from_pretrained(args.model)
    image = Image.open(args.image).convert("RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].to(dtype)
    side = config.vision_config.image_size
    image_tokens = (side // config.vision_config.patch_size) ** 2
    ids = bench_prompt_ids(image_tokens, args.text_tokens, config.text_config.vocab_size, config.image_token_index)
    input_ids = torch.tensor([ids])

    def run_once():
        with torch.inference_mode():
            t = time.perf_counter()
            model.model.get_image_features(pixel_values)
            image_ms = (time.perf_counter() - t) * 1000.0
            t = time.perf_counter()
            out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1)
            prefill_ms = (time.perf_counter() - t) * 1000.0
            past = out.past_key_values
            tokens = [int(nxt[0])]
            t = time.perf_counter()
            for _ in range(1, args.new_tokens):
                out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
                tokens.append(int(nxt[0]))
            decode_ms = (time.perf_counter() - t) * 1000.0
        return image_ms, prefill_ms, decode_ms, tokens

    run_once()  # warm-up
    runs = [run_once() for _ in range(args.repeats)]
    image_ms = statistics.median(r[0] for r in runs)
    prefill_ms = statistics.median(r[1] for r in runs)
    decode_ms = statistics.median(r[2] for r in runs)
    decoded = args.new_tokens - 1
    result = {
        "side": "pytorch",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "attn_implementation": model.config._attn_implementation,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_ms": load_ms,
        "image_encode_ms": image_ms,
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
        "decode_tokens_per_s": decoded / (decode_ms / 1000.0),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": runs[-1][3],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
