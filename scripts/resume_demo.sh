#!/usr/bin/env bash
# kill -9 a run of the default model after KILL_AT layers, resume it, and compare the
# result with an uninterrupted run byte for byte.
#   bash scripts/resume_demo.sh [METHOD] [OUT_DIR] [KILL_AT] [TYPE]
#   (defaults: gptq, bench-out/resume-METHOD, 15, q4_0; METHOD is any of `llmquant quantize --help`)
# Other quantize options can be passed in LLMQUANT_DEMO_ARGS (default: 32 x 512 calibration).
set -euo pipefail
method=${1:-gptq}
out=${2:-bench-out/resume-$method}
kill_at=${3:-15}
qtype=${4:-q4_0}
llmquant=${LLMQUANT:-.venv/bin/llmquant}
read -r -a extra <<< "${LLMQUANT_DEMO_ARGS:---calib-samples 32 --threads 2}"
args=(--type "$qtype" --method "$method" --quiet "${extra[@]}")
echo "== $method, $qtype: ${args[*]}"
mkdir -p "$out"
rm -rf "$out"/whole.gguf "$out"/resumed.gguf "$out"/resumed.gguf.llmquant-work

echo "== uninterrupted run"
/usr/bin/env time -f "%e s, peak %M KiB" "$llmquant" quantize "${args[@]}" --out "$out/whole.gguf" | grep -E "data|time"

echo "== run killed with SIGKILL once $kill_at layers are recorded"
"$llmquant" quantize "${args[@]}" --out "$out/resumed.gguf" > /dev/null &
pid=$!
state="$out/resumed.gguf.llmquant-work/state.json"
until [ -f "$state" ] && python3 -c "import json,sys; sys.exit(json.load(open('$state'))['layers_done'] < $kill_at)" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "the run ended before it could be killed"; exit 1; }
    sleep 0.2
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
python3 -c "import json; s=json.load(open('$state')); print(f\"killed after {s['layers_done']} layers; partial file holds {s['offset']} bytes\")"
ls "$out"

echo "== the same command with --resume"
/usr/bin/env time -f "%e s, peak %M KiB" "$llmquant" quantize "${args[@]}" --out "$out/resumed.gguf" --resume | grep -E "data|time|resumed"

cmp "$out/whole.gguf" "$out/resumed.gguf" && echo "byte-identical: $(sha256sum < "$out/resumed.gguf" | cut -c1-16)"
