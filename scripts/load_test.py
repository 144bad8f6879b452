#!/usr/bin/env python3
"""Load test for `vipllava serve`: N concurrent streaming clients on 127.0.0.1.

For each client count N (default 1, 4, 8) every client sends --requests streaming chat
completions one after another (temperature 0, fixed max_tokens), then the same N x
--requests requests are sent one after another by a single client. Reports total
completion tokens/s, the speed-up over one client and over the sequential run, p50/p99
time to first token, and checks that every request finished exactly once (unique ids,
one [DONE] each). Standard library only; bounded in count and time (--timeout per request).

    vipllava serve --model DIR --port 8080 &
    python3 scripts/load_test.py --url http://127.0.0.1:8080 --image tests/fixtures/images/astronaut.png
"""

import argparse
import base64
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def one_request(url, body, timeout):
    """Returns (ttft seconds, completion tokens, id) of one streaming request."""
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens, ids, done = None, None, set(), 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done += 1
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        ids.add(chunk["id"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if choice["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - start
    conn.close()
    if done != 1 or len(ids) != 1 or tokens is None:
        raise RuntimeError(f"malformed stream: done={done} ids={ids} tokens={tokens}")
    return ttft if ttft is not None else time.perf_counter() - start, tokens, ids.pop()


def run(url, body, clients, per_client, timeout):
    results, errors = [], []
    lock = threading.Lock()

    def client():
        for _ in range(per_client):
            try:
                r = one_request(url, body, timeout)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return results, errors, wall


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="What is in the red box?")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    host = urllib.parse.urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load tests run against 127.0.0.1 only")
    with open(args.image, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    body = json.dumps({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"},
             "visual_prompts": [{"shape": "box", "spec": "45,15,115,95:red"}]},
            {"type": "text", "text": args.prompt}]}],
        "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    })
    one_request(args.url, body, args.timeout)  # warm-up
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'vs 1 client':>11} "
          f"{'sequential tok/s':>16} {'vs sequential':>13} {'ttft p50 ms':>11} {'ttft p99 ms':>11}")
    single = None
    failed = False
    for n in [int(c) for c in args.clients.split(",")]:
        results, errors, wall = run(args.url, body, n, args.requests, args.timeout)
        seq, seq_errors, seq_wall = run(args.url, body, 1, n * args.requests, args.timeout)
        ids = [r[2] for r in results + seq]
        if errors or seq_errors or len(set(ids)) != len(ids) or len(results) != n * args.requests:
            failed = True
            print(f"  n={n}: errors={errors + seq_errors} duplicated ids={len(ids) - len(set(ids))}")
        tokens = sum(r[1] for r in results)
        tps = tokens / wall
        seq_tps = sum(r[1] for r in seq) / seq_wall
        single = single or tps
        ttfts = [r[0] * 1000 for r in results]
        print(f"{n:>7} {len(results):>8} {tokens:>7} {wall:>8.2f} {tps:>8.1f} {tps / single:>10.2f}x "
              f"{seq_tps:>16.1f} {tps / seq_tps:>12.2f}x {statistics.median(ttfts):>11.1f} {pct(ttfts, 99):>11.1f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
