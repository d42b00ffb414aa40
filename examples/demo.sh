#!/usr/bin/env bash
# Demo: run examples/where-am-i.ipynb on an (emulated) FlexAI A100 with plain `jupyter execute`.
#
# Starts the local FlexAI emulator on a free port, installs the flexai-* kernelspecs into a
# private prefix under .demo/, runs the notebook on flexai-a100, prints what its cells printed,
# and shows that no instance outlives the kernel. Needs the project installed in the Python
# environment first on PATH (`make demo` does that). Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

if ! command -v jupyter-flexai >/dev/null; then
    echo "demo.sh: jupyter-flexai not on PATH; run \`make demo\` (it installs the project)" >&2
    exit 1
fi

DEMO=$PWD/.demo
rm -rf "$DEMO"
mkdir -p "$DEMO"

PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
FLEXAI_API_URL=http://127.0.0.1:$PORT
FLEXAI_API_KEY=demo-$(python -c 'import secrets; print(secrets.token_hex(16))')
export FLEXAI_API_URL FLEXAI_API_KEY

# Private Jupyter directories: the demo neither reads nor changes the user's own.
export JUPYTER_PATH=$DEMO/prefix/share/jupyter
export JUPYTER_DATA_DIR=$DEMO/data
export JUPYTER_RUNTIME_DIR=$DEMO/runtime
export JUPYTER_CONFIG_DIR=$DEMO/config

EMULATOR_PID=
stop_emulator() {
    if [[ -n $EMULATOR_PID ]] && kill -0 "$EMULATOR_PID" 2>/dev/null; then
        say "stopping the emulator (pid $EMULATOR_PID)"
        kill -TERM "$EMULATOR_PID"
        wait "$EMULATOR_PID" || true
    fi
}
trap stop_emulator EXIT

say "starting the FlexAI emulator on $FLEXAI_API_URL (log: .demo/emulator.log)"
jupyter flexai emulator --port "$PORT" --api-key "$FLEXAI_API_KEY" >"$DEMO/emulator.log" 2>&1 &
EMULATOR_PID=$!

deadline=$((SECONDS + 30))
until jupyter flexai gpus >/dev/null 2>&1; do
    if ! kill -0 "$EMULATOR_PID" 2>/dev/null; then
        echo "demo.sh: the emulator exited; its log:" >&2
        cat "$DEMO/emulator.log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "demo.sh: the emulator did not answer within 30 s; its log:" >&2
        cat "$DEMO/emulator.log" >&2
        exit 1
    fi
    sleep 0.2
done

say "jupyter flexai gpus"
jupyter flexai gpus

say "jupyter flexai install --prefix .demo/prefix"
jupyter flexai install --prefix "$DEMO/prefix"

say "jupyter kernelspec list"
jupyter kernelspec list

say "jupyter execute --kernel_name=flexai-a100 examples/where-am-i.ipynb"
OUT=$DEMO/where-am-i.out.ipynb
jupyter execute --kernel_name=flexai-a100 --output "$OUT" examples/where-am-i.ipynb

say "what the notebook's cells printed (from .demo/where-am-i.out.ipynb)"
python - "$OUT" <<'PY'
import sys

import nbformat

for cell in nbformat.read(sys.argv[1], as_version=4).cells:
    for output in cell.get("outputs", []):
        print(output.get("text") or output.get("data", {}).get("text/plain", ""), end="")
PY

say "jupyter flexai instances --json (the kernel's instance is gone)"
jupyter flexai instances --json | tee "$DEMO/instances.json"
python - "$DEMO/instances.json" <<'PY'
import json
import sys

live = [i["id"] for i in json.load(open(sys.argv[1])) if i["state"] not in ("stopped", "failed")]
if live:
    sys.exit(f"demo.sh: instances still live after the kernel stopped: {', '.join(live)}")
print("no live instances")
PY
