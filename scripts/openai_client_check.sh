#!/usr/bin/env bash
# Runs the official `openai` Python client (from PyPI, in a venv) against `vipllava serve`
# on a tiny fixture: a non-streaming request, a streaming one (with usage), an image as a
# data URL, the visual-prompt extension, and an error case. Prints a transcript; exits
# non-zero on the first failed check.
#
#   scripts/openai_client_check.sh [VENV_DIR]     (default: $TMPDIR/vipllava-openai-venv)
#
# Uses $VIPLLAVA as the binary if set, else builds target/debug/vipllava with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${TMPDIR:-/tmp}/vipllava-openai-venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --upgrade openai
echo "openai $("$VENV/bin/python" -c 'import openai; print(openai.__version__)')"

if [ -z "${VIPLLAVA:-}" ]; then
    cargo build --quiet --bin vipllava
    VIPLLAVA=target/debug/vipllava
fi
LOG=$(mktemp)
"$VIPLLAVA" serve --model tests/fixtures/tiny-5x-f32 --port 0 --api-key check-key >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
    grep -q '^listening on ' "$LOG" && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.1
done
URL=$(sed -n 's/^listening on //p' "$LOG" | head -1)
[ -n "$URL" ] || { echo "server did not start"; cat "$LOG"; exit 1; }
echo "server: $URL"

"$VENV/bin/python" - "$URL" <<'PY'
import base64, sys
import openai
from openai import OpenAI

url = sys.argv[1]
client = OpenAI(base_url=url + "/v1", api_key="check-key")
image = base64.b64encode(open("tests/fixtures/images/astronaut.png", "rb").read()).decode()
data_url = f"data:image/png;base64,{image}"

print("models:", [m.id for m in client.models.list().data])

r = client.chat.completions.create(
    model="tiny-5x-f32", messages=[{"role": "user", "content": "Say something."}],
    max_tokens=8, temperature=0)
print("non-streaming:", repr(r.choices[0].message.content), "finish:", r.choices[0].finish_reason,
      "usage:", r.usage.prompt_tokens, r.usage.completion_tokens)
assert r.object == "chat.completion" and r.usage.completion_tokens >= 1

image_part = {"type": "image_url", "image_url": {"url": data_url}}
r = client.chat.completions.create(
    model="tiny-5x-f32", max_tokens=20, temperature=0,
    messages=[{"role": "user", "content": [image_part, {"type": "text", "text": "What is in the red box?"}]}])
plain = r.choices[0].message.content
print("data-URL image:", repr(plain), "prompt tokens:", r.usage.prompt_tokens)

stream = client.chat.completions.create(
    model="tiny-5x-f32", max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": [image_part, {"type": "text", "text": "What is in the red box?"}]}])
pieces, finish, usage, roles = [], None, None, []
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
print("streaming:", len(pieces), "pieces", repr("".join(pieces)), "finish:", finish, "usage:", usage.completion_tokens)
assert roles == ["assistant"] and "".join(pieces) == plain and usage is not None

marked = dict(image_part, visual_prompts=[
    {"shape": "box", "spec": "45,15,115,95:red", "alpha": 200},
    {"shape": "arrow", "spec": "155,150,110,100:yellow", "alpha": 200}])
r = client.chat.completions.create(
    model="tiny-5x-f32", max_tokens=20, temperature=0,
    messages=[{"role": "user", "content": [marked, {"type": "text", "text": "What is in the red box?"}]}])
print("visual prompts (box + arrow):", repr(r.choices[0].message.content))
assert r.choices[0].message.content != plain, "the marks did not change the answer"

# The same marks through extra_body: a whole messages list given outside the typed field.
r = client.chat.completions.create(
    model="tiny-5x-f32", max_tokens=20, temperature=0, messages=[],
    extra_body={"messages": [{"role": "user", "content": [marked, {"type": "text", "text": "What is in the red box?"}]}]})
print("visual prompts via extra_body:", repr(r.choices[0].message.content))

try:
    client.chat.completions.create(
        model="tiny-5x-f32", max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}},
                                               {"type": "text", "text": "?"}]}])
    raise SystemExit("bad base64 was accepted")
except openai.BadRequestError as e:
    print("error case (bad base64):", e.status_code, e.body)
try:
    OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    print("error case (wrong key):", e.status_code, e.body)
print("all checks passed")
PY
