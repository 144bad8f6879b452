#!/usr/bin/env python3
"""llama.cpp beside vipllava on the same machine: build it, convert the benchmark model's
language model to GGUF, and run both interleaved (issue 17).

llama.cpp comes from the sources vendored in the `llama-cpp-python` source package on the
Python registry, built with the `cmake` wheel from the same registry: no other network.

Steps (each skips what is already there under --work, default bench-data/llamacpp):

    # 0. the benchmark checkpoints (scripts/make_bench_checkpoint.py) and our release binary
    .venv/bin/python scripts/make_bench_checkpoint.py --out bench-data
    cargo build --release
    # 1. download and build llama-bench and llama-quantize (about 10 minutes on 2 cores)
    .venv/bin/python scripts/bench_llamacpp.py build
    # 2. the Llama of a VipLlava checkpoint as a LlamaForCausalLM directory (checked: equal
    #    logits in transformers), converted by llama.cpp's convert_hf_to_gguf.py to F32, F16,
    #    BF16 and Q8_0 (the converter also needs `.venv/bin/pip install sentencepiece`), and
    #    quantized by llama-quantize to Q4_0
    .venv/bin/python scripts/bench_llamacpp.py gguf --model bench-data/clip-l-llama-1b-f32 --check
    # 3. interleaved: per round and precision, llama-bench then vipllava bench; medians, ratios
    .venv/bin/python scripts/bench_llamacpp.py compare --vipllava target/release/vipllava \\
        --model-dir bench-data --image bench-data/astronaut.png --rounds 2

At the 7B size (scripts/make_random_checkpoint.py; its F32 file would not fit 24 GiB of memory):
the GGUF files in a directory of their own, BF16 converted, Q8_0 and Q4_0 quantized from it by
llama-quantize, and our side run on the same VipLlava directory in every precision:

    .venv/bin/python scripts/bench_llamacpp.py --gguf-dir bench-data/llamacpp-7b gguf \\
        --model /tmp/vip7b --precisions bf16,q8,q4
    .venv/bin/python scripts/bench_llamacpp.py --gguf-dir bench-data/llamacpp-7b compare \\
        --model /tmp/vip7b --precisions bf16,q8,q4 --rounds 2

The comparison: decode tokens/s at a 617-token context (`llama-bench -p 0 -n 32 -d 617` vs the
decode of `vipllava bench --batch-sizes 1`, whose prompt is 617 tokens with the image) and the
prefill of 617 tokens (`llama-bench -p 617 -n 0` vs our prefill minus the image encoding), both
with 2 threads. Precisions: f32 (F32 GGUF vs our f32), f16 (F16 vs `--dtype f16`, our side
rounding the f32 files at load), bf16 (BF16 vs `--dtype bf16`), q8 (Q8_0 vs
`--dtype bf16 --quantize q8 --quantize-lm-head q8`), q4 (Q4_0 vs `--dtype bf16 --quantize q4
--quantize-lm-head q8`): llama.cpp's quantized files hold the output matrix quantized too (Q8_0 in
its Q8_0 file, Q6_K in its Q4_0 file).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from common import REPO_ROOT, log

WORK = REPO_ROOT / "bench-data" / "llamacpp"
PACKAGE = "llama-cpp-python"
# GGUF name per precision, and how each side runs it.
GGUF = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8": "Q8_0", "q4": "Q4_0"}
# Every precision both sides run (f16 too: the hub 7B's own dtype).
ALL_PRECISIONS = ",".join(GGUF)
OURS = {
    "f32": ("clip-l-llama-1b-f32", ["--dtype", "f32"]),
    # f16 from the f32 files, rounded at load (the hub 7B's own dtype; llama.cpp's default
    # conversion).
    "f16": ("clip-l-llama-1b-f32", ["--dtype", "f16"]),
    "bf16": ("clip-l-llama-1b-bf16", ["--dtype", "bf16"]),
    # lm_head quantized as in llama.cpp's files: its Q8_0 conversion stores the output
    # matrix in Q8_0, llama-quantize's Q4_0 in Q6_K (we use q8, the nearer of ours above it).
    "q8": ("clip-l-llama-1b-bf16", ["--dtype", "bf16", "--quantize", "q8", "--quantize-lm-head", "q8"]),
    "q4": ("clip-l-llama-1b-bf16", ["--dtype", "bf16", "--quantize", "q4", "--quantize-lm-head", "q8"]),
}
CONTEXT = 617
NEW_TOKENS = 32
THREADS = 2


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_src(work: Path) -> Path:
    found = sorted(glob.glob(str(work / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not found:
        raise SystemExit(f"no llama.cpp sources under {work / 'src'}: run `build` first")
    return Path(found[-1])


def binary(work: Path, name: str) -> Path:
    path = work / "build" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} missing: run `build` first")
    return path


def cmd_build(args) -> None:
    work = Path(args.work)
    (work / "src").mkdir(parents=True, exist_ok=True)
    if not glob.glob(str(work / "src" / "llama_cpp_python-*")):
        dl = work / "download"
        dl.mkdir(exist_ok=True)
        spec = PACKAGE + (f"=={args.version}" if args.version else "")
        run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "--no-binary", PACKAGE, "-d", dl])
        (sdist,) = glob.glob(str(dl / "llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
    src = llama_src(work)
    venv = work / "venv"
    cmake = venv / "bin" / "cmake"
    if not cmake.is_file():
        run([sys.executable, "-m", "venv", venv])
        run([venv / "bin" / "pip", "install", "-q", "cmake"])
    build = work / "build"
    # -march=native, or with --no-amx the AVX-512 set without AMX: on a KVM guest reporting
    # AMX, llama.cpp's AMX buffer type for Q8_0/Q4_0 died with SIGILL at its first `tileloadd`.
    cpu = ["-DGGML_NATIVE=ON"] if not args.no_amx else [
        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
        "-DGGML_AVX512_BF16=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    run([cmake, "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *cpu, "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF"])
    run([cmake, "--build", build, "--target", "llama-bench", "llama-quantize", f"-j{os.cpu_count() or 2}"])
    log(f"built {binary(work, 'llama-bench')} and {binary(work, 'llama-quantize')}")


def language_model_key(key: str) -> str | None:
    """A VipLlava tensor name -> its LlamaForCausalLM name (hub 4.x and transformers 5.x)."""
    for prefix, to in (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
        if key.startswith(prefix):
            return to + key[len(prefix):]
    return None


def extract_llama(model_dir: Path, out: Path) -> None:
    """Writes the language model of a VipLlava directory as a LlamaForCausalLM directory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    text = dict(config["text_config"])
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    for key in ("torch_dtype", "dtype"):
        if key in config and key not in text:
            text[key] = config[key]
    if os.path.isdir(out):
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    pad_tokenizer(out / "tokenizer.json", text["vocab_size"])
    weight_map = {}
    for n, path in enumerate(sorted(model_dir.glob("*.safetensors"))):
        tensors = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                new = language_model_key(key)
                if new is not None:
                    tensors[new] = f.get_tensor(key).contiguous()
        if tensors:
            shard = f"model-{n:05d}.safetensors"
            save_file(tensors, out / shard, metadata={"format": "pt"})
            weight_map.update({k: shard for k in tensors})
    total = sum(os.path.getsize(out / s) for s in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    log(f"extracted {len(weight_map)} tensors -> {out}")


def pad_tokenizer(path: Path, vocab_size: int) -> None:
    """Adds placeholder special tokens up to the embedding's row count: llama.cpp wants as
    many tokens as embedding rows (the checkpoints pad the vocabulary past the tokenizer's)."""
    tok = json.loads(path.read_text())
    used = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok.get("added_tokens", [])}
    for i in range(vocab_size):
        if i not in used:
            tok.setdefault("added_tokens", []).append({
                "id": i, "content": f"<extra_{i}>", "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True})
    path.write_text(json.dumps(tok, ensure_ascii=False))


def check_logits(model_dir: Path, llama_dir: Path) -> None:
    """The extracted Llama gives the VipLlava language model's logits on text ids, bit for bit."""
    import torch
    from transformers import LlamaForCausalLM, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    vip = VipLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = vip.config.text_config.vocab_size
    ids = torch.randint(1, min(vocab, 32000), (1, 24))
    with torch.no_grad():
        hidden = vip.model.language_model(input_ids=ids).last_hidden_state
        want = vip.lm_head(hidden)
    del vip
    llama = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = llama(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    log(f"extracted Llama vs VipLlava language model: logits max |diff| = {diff}")
    if diff != 0.0:
        raise SystemExit("the extracted Llama does not reproduce the language model's logits")


def require_converter_modules() -> None:
    """llama.cpp's convert_hf_to_gguf.py imports these: say so before the extraction, not after."""
    missing = [m for m in ("sentencepiece", "numpy", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"convert_hf_to_gguf.py needs {', '.join(missing)}: pip install {' '.join(missing)}")


def precisions(value: str) -> list[str]:
    """`--precisions`, checked: a typo should not cost a conversion or a round."""
    names = value.split(",")
    unknown = [p for p in names if p not in GGUF]
    if unknown:
        raise SystemExit(f"unknown precision(s) {', '.join(unknown)}: choose from {', '.join(GGUF)}")
    return names


def cmd_gguf(args) -> None:
    require_converter_modules()
    work, out_dir = Path(args.work), gguf_dir(args)
    wanted = precisions(args.precisions)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    llama_dir = out_dir / "llama-hf"
    # With F32 the converter writes F32, BF16 and Q8_0 and llama-quantize makes Q4_0 from F32;
    # without it (a 7B, whose F32 file is 27 GB) only BF16 is converted, and the extracted
    # directory (13 GB at 7B) is removed before Q8_0 and Q4_0 are quantized from BF16. F16 is
    # always converted, when asked for.
    converted = ["f32", "bf16", "q8"] if "f32" in wanted else ["bf16"]
    converted += ["f16"] if "f16" in wanted else []
    source = "F32" if "f32" in wanted else "BF16"
    missing = [p for p in converted if not (out_dir / f"llama-{GGUF[p]}.gguf").is_file()]
    if missing and not (llama_dir / "model.safetensors.index.json").is_file():
        extract_llama(model_dir, llama_dir)
        if args.check:
            check_logits(model_dir, llama_dir)
    src = llama_src(work)
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for p in missing:
        out = out_dir / f"llama-{GGUF[p]}.gguf"
        partial = out.with_suffix(".partial")
        outtype = GGUF[p].lower()
        run([sys.executable, src / "convert_hf_to_gguf.py", llama_dir, "--outtype", outtype, "--outfile", partial],
            env=env)
        partial.rename(out)
    if not args.keep_hf and llama_dir.is_dir():
        shutil.rmtree(llama_dir)  # 4.4 GB for the benchmark model; the GGUF files are what is used
    for p in wanted:
        out = out_dir / f"llama-{GGUF[p]}.gguf"
        if out.is_file():
            continue
        partial = out.with_suffix(".partial")
        run([binary(work, "llama-quantize"), out_dir / f"llama-{source}.gguf", partial, GGUF[p]])
        partial.rename(out)


def gguf_dir(args) -> Path:
    """Where the GGUF files are: `--gguf-dir`, or the build's directory (`--work`)."""
    return Path(args.gguf_dir or args.work)


def llama_bench(work: Path, models: Path, precision: str) -> dict:
    model = models / f"llama-{GGUF[precision]}.gguf"
    if not model.is_file():
        raise SystemExit(f"{model} missing: run `gguf` with --precisions {precision} first")
    bench = binary(work, "llama-bench")
    out = {}
    for flags, key in ((["-p", CONTEXT, "-n", 0], "prefill_tokens_per_s"),
                       (["-p", 0, "-n", NEW_TOKENS, "-d", CONTEXT], "decode_tokens_per_s")):
        r = run([bench, "-m", model, "-t", THREADS, "-r", 1, "-o", "json", *flags], capture_output=True, text=True)
        rows = json.loads(r.stdout)
        out[key] = rows[0]["avg_ts"]
    out["prefill_ms"] = 1000.0 * CONTEXT / out["prefill_tokens_per_s"]
    return out


def vipllava_bench(binary_path: str, model_dir: Path, model: Path | None, image: str, precision: str) -> dict:
    name, flags = OURS[precision]
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    r = run([binary_path, "bench", "--model", model or model_dir / name, "--image", image, "--batch-sizes", "1",
             "--new-tokens", NEW_TOKENS, "--repeats", "1", "--json", *flags], capture_output=True, text=True, env=env)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    if row["prompt_tokens"] != CONTEXT:
        raise SystemExit(f"vipllava's prompt is {row['prompt_tokens']} tokens, not {CONTEXT}")
    return {
        "decode_tokens_per_s": row["decode_tokens_per_s"],
        # The text prefill alone: the image tokens are prefilled, the vision tower is not.
        "prefill_ms": row["prefill_ms"] - row["image_encode_ms"],
        "peak_rss_mb": row["peak_rss_mb"],
    }


def cmd_compare(args) -> None:
    work, models = Path(args.work), gguf_dir(args)
    model_dir = Path(args.model_dir)
    model = Path(args.model) if args.model else None
    wanted = precisions(args.precisions)
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        for p in wanted:
            for side in ("llama.cpp", "vipllava"):
                t0 = time.time()
                if side == "llama.cpp":
                    r = llama_bench(work, models, p)
                else:
                    r = vipllava_bench(args.vipllava, model_dir, model, args.image, p)
                r["load_avg"] = os.getloadavg()[0]
                log(f"round {rnd + 1} {p} {side}: {r} ({time.time() - t0:.0f} s)")
                results.setdefault((p, side), []).append(r)
                if args.json:
                    print(json.dumps({"round": rnd + 1, "precision": p, "side": side, **r}), flush=True)

    def med(p, side, key):
        return statistics.median(r[key] for r in results[(p, side)])

    print(f"\n| precision | decode tok/s llama.cpp | decode tok/s vipllava | us / llama.cpp | prefill ms llama.cpp | "
          f"prefill ms vipllava | llama.cpp / us |")
    print("|---|---|---|---|---|---|---|")
    for p in wanted:
        dl, dv = med(p, "llama.cpp", "decode_tokens_per_s"), med(p, "vipllava", "decode_tokens_per_s")
        pl, pv = med(p, "llama.cpp", "prefill_ms"), med(p, "vipllava", "prefill_ms")
        print(f"| {p} ({GGUF[p]}) | {dl:.2f} | {dv:.2f} | {dv / dl:.2f} | {pl:.0f} | {pv:.0f} | {pl / pv:.2f} |")
    print(f"\nmedians of {args.rounds} round(s); context {CONTEXT}, {NEW_TOKENS} new tokens, {THREADS} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(WORK), help="llama.cpp's sources and build (and the GGUF files by default)")
    ap.add_argument("--gguf-dir", default="", help="where the GGUF files are written and read (default: --work)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download and build llama-bench and llama-quantize")
    b.add_argument("--version", default="", help="llama-cpp-python version (default: the newest)")
    b.add_argument("--no-amx", action="store_true",
                   help="build for AVX-512 (VNNI, BF16) without AMX instead of -march=native")
    g = sub.add_parser("gguf", help="extract the Llama and convert it to GGUF")
    g.add_argument("--model", required=True, help="a VipLlava HF directory (f32 for the F32/F16/BF16/Q8_0/Q4_0 set)")
    g.add_argument("--check", action="store_true", help="check the extracted Llama's logits in transformers")
    g.add_argument("--keep-hf", action="store_true", help="keep the extracted LlamaForCausalLM directory")
    g.add_argument("--precisions", default=ALL_PRECISIONS,
                   help="GGUF files to make; without f32, Q8_0 and Q4_0 are quantized from BF16")
    c = sub.add_parser("compare", help="llama-bench and vipllava bench, interleaved")
    c.add_argument("--vipllava", default=str(REPO_ROOT / "target" / "release" / "vipllava"))
    c.add_argument("--model-dir", default=str(REPO_ROOT / "bench-data"),
                   help="holds the benchmark's clip-l-llama-1b-f32 and -bf16 checkpoints")
    c.add_argument("--model", default="", help="one VipLlava directory for every precision instead (a 7B)")
    c.add_argument("--image", default=str(REPO_ROOT / "bench-data" / "astronaut.png"))
    c.add_argument("--precisions", default=ALL_PRECISIONS, help="some of " + ALL_PRECISIONS)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--json", action="store_true", help="also print one JSON line per measurement")
    args = ap.parse_args()
    {"build": cmd_build, "gguf": cmd_gguf, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
