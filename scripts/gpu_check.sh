#!/usr/bin/env bash
# shellcheck disable=SC2317  # the dry-run check functions are called through `check`
# Loom's CUDA paths on one GPU machine in one run (about 8 minutes on an H200), ending in one table.
# `--help` says how; DEVELOPERS.md says how to run it through the device tool.
set -uo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/gpu_check.sh [options]

Proves Loom's CUDA paths on a GPU machine with no network, step by step, each
under a hard time limit, then prints one table (step, status, seconds, key number):

  setup         python, torch + CUDA, the carried wheels installed (--no-index), imports
  random-base   benchmarks/random_base.py: a random-weights base of the --shape
                (Mistral-7B: 7.2B parameters, bf16), imported into a temp store
  engine-bench  benchmarks/engine.py --quick on that base, cuda, bf16 (HF/PEFT rows
                and Loom's rows 4-6; key: tok/s)
  qlora-train   loom train --qlora (4-bit NF4 via bitsandbytes) for a few steps,
                --publish into the store (key: final loss, tok/s)
  serve-openai  loom serve in the background with two adapters (the QLoRA one and a
                benchmark one), the official `openai` client's chat.completions
                against each, then SIGINT and a clean exit (key: the answers)

Options:
  --python PY        interpreter with CUDA torch (default: python3; the GPU image's
                     python3 is the one that holds torch)
  --wheels DIR       wheels to install first, with pip --no-index --no-deps into a
                     private folder on PYTHONPATH (a venv made from the image's own
                     venv python would not see its CUDA torch); nothing is downloaded.
                     Build DIR here with scripts/gpu_wheels.sh; its DIR/tokenizer is
                     used as --tokenizer unless one is given.
  --tokenizer DIR    tokenizer folder the random base borrows (tokenizer.json + chat template)
  --shape NAME       random base shape: mistral-7b (default), smollm2-135m, tiny
  --device DEV       cuda (default) or cpu: a rehearsal without a GPU (QLoRA off, fp32;
                     use it with --shape tiny)
  --train-steps N    QLoRA optimizer steps (default 5)
  --engine-args STR  extra arguments for benchmarks/engine.py (default: --quick)
  --budget S         seconds for the whole run (default 570: one 600 s device call);
                     each step gets min(its own limit, what is left after the later
                     steps' reserves), and is skipped when that is under 30 s
  --work DIR         working folder (default: a new temp folder; its store holds the
                     base: ~15 GB for Mistral-7B, twice while importing)
  --out DIR          copy the table (gpu_check.txt and .json), engine.json and each
                     step's log there (8 files at most, as the device tool's $OUT takes)
  --keep             keep the working folder
  --dry-run          print every command with its resolved paths and check what can be
                     checked without a GPU (files, CLI flags, helper snippets); exit 0
                     when all is in place
  -h, --help         this text

On the device tool (see DEVELOPERS.md), after scripts/gpu_wheels.sh here:
  run(command='bash scripts/gpu_check.sh --wheels .gpu-wheels --out "$OUT"',
      carry=[".gpu-wheels"], timeout_s=600)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=python3
WHEELS=""
TOKENIZER=""
SHAPE=mistral-7b
DEVICE=cuda
TRAIN_STEPS=5
ENGINE_ARGS="--quick"
BUDGET=570
WORK=""
OUT_DIR=""
KEEP=0
DRY=0
while (($#)); do
	case $1 in
	--python) PY=$2; shift 2 ;;
	--wheels) WHEELS=$2; shift 2 ;;
	--tokenizer) TOKENIZER=$2; shift 2 ;;
	--shape) SHAPE=$2; shift 2 ;;
	--device) DEVICE=$2; shift 2 ;;
	--train-steps) TRAIN_STEPS=$2; shift 2 ;;
	--engine-args) ENGINE_ARGS=$2; shift 2 ;;
	--budget) BUDGET=$2; shift 2 ;;
	--work) WORK=$2; shift 2 ;;
	--out) OUT_DIR=$2; shift 2 ;;
	--keep) KEEP=1; shift ;;
	--dry-run) DRY=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
	esac
done
if ! command -v "$PY" >/dev/null; then
	echo "gpu_check.sh: --python $PY: not found; give the interpreter that holds CUDA torch" >&2
	exit 2
fi
PY=$(command -v "$PY")
if [[ -n $WHEELS ]]; then
	WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd) || {
		echo "gpu_check.sh: --wheels $WHEELS: no such folder; build it with scripts/gpu_wheels.sh" >&2
		exit 2
	}
	[[ -z $TOKENIZER && -d $WHEELS/tokenizer ]] && TOKENIZER=$WHEELS/tokenizer
fi
[[ -n $TOKENIZER ]] && TOKENIZER=$(cd "$TOKENIZER" 2>/dev/null && pwd || echo "$TOKENIZER")
if ((!DRY)) && [[ ! -f $TOKENIZER/tokenizer.json ]]; then # the dry run reports it among its checks
	echo "gpu_check.sh: no tokenizer.json in '${TOKENIZER}': pass --wheels DIR (gpu_wheels.sh puts one" \
		"in DIR/tokenizer) or --tokenizer DIR" >&2
	exit 2
fi
if [[ $DEVICE == cpu ]]; then DTYPE=float32; QLORA=(); else DTYPE=bfloat16; QLORA=(--qlora); fi

if [[ -z $WORK ]]; then
	WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-gpu-check.XXXXXX")
	((KEEP)) || trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"/{logs,helpers,tmp}
WORK=$(cd "$WORK" && pwd)
SITE=$WORK/site
export PYTHONPATH="$REPO/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LOOM_STORE=$WORK/store TMPDIR=$WORK/tmp HF_HOME=$WORK/hf PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg COLUMNS=300

BASE_REF="$SHAPE-random@v1"
ADAPTER=gpucheck-qlora
ADAPTER_REF="$ADAPTER@v1"
BENCH_A="bench-0000-$SHAPE-random@v1" # made by engine.py (and by the serve helper if not)
BENCH_B="bench-0001-$SHAPE-random@v1"
DATA=$REPO/examples/snips_intent/train_sample.jsonl

# ---------------------------------------------------------------- helper snippets
cat >"$WORK/helpers/setup_check.py" <<'PYEOF'
"""Versions, the GPU, and every module the later steps import."""
import importlib
import sys

import torch

device = sys.argv[1]
print(f"python {sys.version.split()[0]} at {sys.executable}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch: run this on the GPU machine (or --device cpu)")
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.mem_get_info()[1] / 2**30:.0f} GiB")
need = ["loom", "loom.cli.main", "transformers", "peft", "trl", "datasets", "accelerate", "fastapi",
        "uvicorn", "openai", "llguidance", "sqlalchemy", "gguf", "pydantic"]
if device == "cuda":
    need.append("bitsandbytes")
missing = []
for name in need:
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # a broken import is as missing as an absent one
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + ". Build the wheels with scripts/gpu_wheels.sh, pass --wheels")
# versions: pyproject.toml's requirements (an image's older package imports but may misbehave)
import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

project = tomllib.loads(Path(sys.argv[2], "pyproject.toml").read_text())["project"]
unmet = []
for text in project["dependencies"] + (project["optional-dependencies"]["cuda"] if device == "cuda" else []):
    req = Requirement(text)
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (have {have})")
if unmet:
    sys.exit("unmet: " + "; ".join(unmet) + ". Carry them: scripts/gpu_wheels.sh --force NAME,...")
print(f"KEY torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ", cpu"))
PYEOF

cat >"$WORK/helpers/serve_check.py" <<'PYEOF'
"""loom serve in the background, the official openai client against two adapters, a clean stop.

    serve_check.py --repo R --base REF --adapters A,B -- loom serve ... --port {port} ...
"""
import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

from loom.serve.server import free_port, wait_healthy
from loom.store import Store


def bench_adapters(repo: Path, base: str, count: int) -> list[str]:
    """benchmarks/engine.py's random adapters (made there already, unless that step failed)."""
    spec = importlib.util.spec_from_file_location("bench_engine", repo / "benchmarks" / "engine.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_adapters(Store(), base, count)


def stop(server: subprocess.Popen, result: dict) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # graceful: uvicorn drains, then the engine stops
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            result["stop"] = "killed after 60 s"
    result["exit_code"] = server.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapters", required=True, help="comma-separated refs, each asked once")
    ap.add_argument("server", nargs=argparse.REMAINDER, help="-- then the server command, {port} in it")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still stop the server
    bench_adapters(args.repo, args.base, 2)
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in args.server if a != "--"]
    url = f"http://127.0.0.1:{port}"
    result: dict = {"answers": {}}
    start = time.monotonic()
    print("$ " + " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd)
    ok = False
    try:
        wait_healthy(url, timeout=600)
        result["startup_s"] = round(time.monotonic() - start, 1)
        client = OpenAI(base_url=f"{url}/v1", api_key="gpu-check", timeout=120, max_retries=0)
        ok = True
        for ref in args.adapters.split(","):
            r = client.chat.completions.create(
                model=ref,
                messages=[
                    {"role": "system", "content": "You label voice-assistant requests."},
                    {"role": "user", "content": "Intent of: play some jazz in the kitchen"},
                ],
                max_tokens=12,
                temperature=0,
            )
            text = r.choices[0].message.content or ""
            result["answers"][ref] = {"model": r.model, "text": text, "tokens": r.usage.completion_tokens}
            print(f"{ref}: model={r.model!r} tokens={r.usage.completion_tokens} text={text!r}", flush=True)
            ok = ok and r.model.split("@")[0] == ref.split("@")[0] and r.usage.completion_tokens > 0
    finally:
        stop(server, result)
    ok = ok and result["exit_code"] == 0
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
PYEOF

cat >"$WORK/helpers/keys.py" <<'PYEOF'
"""The table's key number for a step, from what the step left behind."""
import json
import re
import sys
from pathlib import Path


def engine(path: str) -> str:
    rows = {r["row"][:1]: r for r in json.loads(Path(path).read_text())["rows"]}
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    return (f"tok/s: HF {tps.get('1')}, PEFT mixed {tps.get('3')}, Loom base {tps.get('4')}, "
            f"8 adapters {tps.get('5')}, random resident {tps.get('6')}")


def train(folder: str, ref: str) -> str:
    from loom.store import Store

    s = json.loads(Path(folder, "training_summary.json").read_text())
    Store().resolve(ref)  # raises when --publish did not put it in the store
    loss, tps = s.get("final_train_loss"), s.get("tokens_per_second")
    kind = "QLoRA nf4" if s["hyperparameters"].get("qlora") else "LoRA (no --qlora)"
    return f"{kind}: loss {loss:.3f}, {tps} tok/s, {s.get('peak_memory_mb')} MB peak, published {ref}"


def log_line(path: str, pattern: str) -> str:
    hits = [m.group(1) for m in re.finditer(pattern, Path(path).read_text(errors="replace"), re.M)]
    return hits[-1] if hits else "-"


def serve(path: str) -> str:
    result = json.loads(log_line(path, r"^RESULT (.*)$"))
    answers = "; ".join(f"{k.split('@')[0]}: {v['text'][:24]!r}" for k, v in result["answers"].items())
    return f"up in {result.get('startup_s')} s; {answers}; exit {result.get('exit_code')}"


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    try:
        out = {"engine": engine, "train": train, "serve": serve}[kind](*rest) if kind != "log" else log_line(*rest)
    except Exception as exc:
        out = f"({type(exc).__name__}: {exc})"
    print(out.replace("|", "/")[:160])
PYEOF

# ---------------------------------------------------------------- steps and their limits
# name, own limit (s), reserve (s) the step needs at least: an earlier step may not eat it
STEPS=(setup random-base engine-bench qlora-train serve-openai)
declare -A LIMIT=([setup]=180 [random-base]=240 [engine-bench]=300 [qlora-train]=240 [serve-openai]=180)
declare -A RESERVE=([setup]=30 [random-base]=90 [engine-bench]=90 [qlora-train]=90 [serve-openai]=90)
declare -A STATUS SECS KEY
T0=${EPOCHREALTIME/,/.}
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The time limit a step gets: its own, or what the budget leaves after the later steps' reserves.
step_limit() {
	local name=$1 later=0 seen=0 s left
	for s in "${STEPS[@]}"; do
		((seen)) && later=$((later + RESERVE[$s]))
		[[ $s == "$name" ]] && seen=1
	done
	left=$(awk -v t0="$T0" -v b="$BUDGET" -v n="$(now)" -v l="$later" 'BEGIN { printf "%d", b - (n - t0) - l }')
	((left > LIMIT[$name])) && left=${LIMIT[$name]}
	echo "$left"
}

show() { printf '%q ' "$@"; }

# run_step NAME CMD...: the command under `timeout`, its output in logs/NAME.log
run_step() {
	local name=$1 limit start rc
	shift
	limit=$(step_limit "$name")
	echo
	echo "== $name (limit ${limit}s): $(show "$@")"
	if ((DRY)); then
		STATUS[$name]=dry-run SECS[$name]=0 KEY[$name]="limit ${LIMIT[$name]} s"
		return 0
	fi
	if ((limit < 30)); then
		STATUS[$name]=skipped SECS[$name]=0 KEY[$name]="budget spent (${limit} s left)"
		return 1
	fi
	start=$(now)
	timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
	rc=$?
	SECS[$name]=$(elapsed "$start")
	if ((rc == 0)); then
		STATUS[$name]=ok
	else
		((rc == 124 || rc == 137)) && STATUS[$name]="timeout" || STATUS[$name]="FAIL rc=$rc"
		KEY[$name]=$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-150)
		echo "-- $name: ${STATUS[$name]}; the end of its log:"
		tail -n 25 "$WORK/logs/$name.log"
	fi
	echo "-- $name: ${STATUS[$name]} in ${SECS[$name]} s"
	return $rc
}

skip() { STATUS[$1]=skipped SECS[$1]=0 KEY[$1]=$2; echo "== $1: skipped ($2)"; }
key() { ((DRY)) || KEY[$1]=$("$PY" "$WORK/helpers/keys.py" "${@:2}"); }

# ---------------------------------------------------------------- the commands
SETUP_INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
	--target "$SITE")
SETUP_CHECK=("$PY" "$WORK/helpers/setup_check.py" "$DEVICE" "$REPO")
BASE_CMD=("$PY" "$REPO/benchmarks/random_base.py" --shape "$SHAPE" --name "$SHAPE-random"
	--dtype "$DTYPE" --tokenizer "$TOKENIZER")
# shellcheck disable=SC2206  # ENGINE_ARGS is a word list by design
ENGINE_CMD=("$PY" "$REPO/benchmarks/engine.py" --base "$BASE_REF" --device "$DEVICE" --dtype "$DTYPE"
	--data "$DATA" --json "$WORK/engine.json" $ENGINE_ARGS)
TRAIN_CMD=("$PY" -m loom train --model_name_or_path "$BASE_REF" --train-files "$DATA"
	--system-prompt "You label voice-assistant requests." --input-template 'Intent of: {text}'
	--output-template '{{"intent": "{label}"}}' --max-train-samples 64 "${QLORA[@]}"
	--max-steps "$TRAIN_STEPS" --train-batch-size 8 --learning-rate 1e-3 --device "$DEVICE"
	--dtype "$DTYPE" --output_dir "$WORK/train" --agent gpucheck --adapter-name "$ADAPTER"
	--adapter-version v1 --publish)
serve_cmd() { # $1: the two adapters served, comma-separated
	SERVE_HELPER=("$PY" "$WORK/helpers/serve_check.py" --repo "$REPO" --base "$BASE_REF" --adapters "$1")
	SERVE_SERVER=("$PY" -m loom serve --base "$BASE_REF" --device "$DEVICE" --dtype "$DTYPE" --port "{port}"
		--preload "${1%%,*}" --preload "${1#*,}" --max-batch-size 8 --max-seq-len 512
		--request-log off --log-level warning)
	SERVE_CMD=("${SERVE_HELPER[@]}" -- "${SERVE_SERVER[@]}")
}

# ---------------------------------------------------------------- dry-run checks
FAILS=0
check() { # check DESCRIPTION CMD...: one line, ok or FAIL
	if "${@:2}" >"$WORK/tmp/check.out" 2>&1; then
		echo "  ok    $1"
	else
		echo "  FAIL  $1"
		sed 's/^/        /' "$WORK/tmp/check.out" | tail -n 8
		FAILS=$((FAILS + 1))
	fi
}
# flags_exist HELP_CMD... -- CMD...: every --flag of CMD appears in HELP_CMD's output
flags_exist() {
	local help=() cmd=() f missing=() text
	while [[ $1 != -- ]]; do help+=("$1"); shift; done
	shift
	cmd=("$@")
	text=$("${help[@]}" 2>&1) || { echo "$text" | tail -n 5; return 1; }
	for f in "${cmd[@]}"; do
		[[ $f == --* && $f != -- ]] || continue
		f=${f%%=*}
		grep -qE -- "(^|[^A-Za-z0-9_-])$f([^A-Za-z0-9_-]|$)" <<<"$text" || missing+=("$f")
	done
	((${#missing[@]} == 0)) || { echo "not in its --help: ${missing[*]}"; return 1; }
	echo "flags: $(printf '%s\n' "${cmd[@]}" | grep -c '^--[a-z]')"
}
tokenizer_ok() {
	[[ -n $TOKENIZER ]] || { echo "no tokenizer: pass --wheels DIR (from scripts/gpu_wheels.sh) or --tokenizer DIR"; return 1; }
	"$PY" -c 'import sys; from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1]); assert t.chat_template, "no chat template"
print(len(t), "tokens")' "$TOKENIZER"
}
wheels_ok() {
	[[ -z $WHEELS ]] && { echo "no --wheels: the python must hold everything already"; return 0; }
	ls "$WHEELS"/*.whl >/dev/null || { echo "no *.whl in $WHEELS"; return 1; }
	if [[ $DEVICE == cuda ]] && ! ls "$WHEELS"/bitsandbytes-*.whl >/dev/null 2>&1; then
		echo "no bitsandbytes wheel in $WHEELS (the GPU image lacks it)"
		return 1
	fi
	find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l
}
dry_checks() {
	serve_cmd "$ADAPTER_REF,$BENCH_A"
	echo
	echo "== checks (no GPU needed)"
	check "timeout(1) is here" command -v timeout
	check "files: benchmarks/random_base.py, benchmarks/engine.py, $DATA" \
		test -f "$REPO/benchmarks/random_base.py" -a -f "$REPO/benchmarks/engine.py" -a -s "$DATA"
	check "wheels: ${WHEELS:-none}" wheels_ok
	check "tokenizer: ${TOKENIZER:-none}" tokenizer_ok
	check "helper snippets compile" "$PY" -m py_compile "$WORK"/helpers/*.py
	check "setup_check.py passes here (as on cpu: no bitsandbytes)" "$PY" "$WORK/helpers/setup_check.py" cpu "$REPO"
	check "random_base.py flags" flags_exist "$PY" "$REPO/benchmarks/random_base.py" --help -- "${BASE_CMD[@]}"
	check "engine.py flags" flags_exist "$PY" "$REPO/benchmarks/engine.py" --help -- "${ENGINE_CMD[@]}"
	check "loom train flags" flags_exist "$PY" -m loom train --help -- "${TRAIN_CMD[@]}"
	check "loom serve flags" flags_exist "$PY" -m loom serve --help -- "${SERVE_SERVER[@]}"
	check "serve_check.py flags" flags_exist "$PY" "$WORK/helpers/serve_check.py" --help -- "${SERVE_HELPER[@]}"
	check "pip install flags" flags_exist "$PY" -m pip install --help -- "${SETUP_INSTALL[@]}"
}

# ---------------------------------------------------------------- run
echo "gpu_check: repo $REPO, python $PY, device $DEVICE $DTYPE, shape $SHAPE, budget ${BUDGET}s"
echo "           work $WORK, store $LOOM_STORE, wheels ${WHEELS:-none}, tokenizer ${TOKENIZER:-none}"
((DRY)) && echo "           (dry run: printing the commands, running none of them)"

# setup: one generated script (install, then the import check), so the step has one time limit
{
	echo "set -e"
	[[ -n $WHEELS ]] && echo "$(show "${SETUP_INSTALL[@]}") $(printf '%q' "$WHEELS")/*.whl"
	echo "$(show "$PY") -m pip check | head -n 20 || true  # for the log: what else disagrees"
	show "${SETUP_CHECK[@]}"
	echo
} >"$WORK/helpers/setup.sh"
run_step setup bash "$WORK/helpers/setup.sh" && key setup log "$WORK/logs/setup.log" '^KEY (.*)$'
((DRY)) && sed 's/^/   | /' "$WORK/helpers/setup.sh"

if [[ ${STATUS[setup]} == ok || $DRY == 1 ]]; then
	run_step random-base "${BASE_CMD[@]}" && key random-base log "$WORK/logs/random-base.log" '^(.*parameters.*?), importing'
else
	skip random-base "setup failed"
fi

if [[ ${STATUS[random-base]} == ok || $DRY == 1 ]]; then
	run_step engine-bench "${ENGINE_CMD[@]}" && key engine-bench engine "$WORK/engine.json"
	run_step qlora-train "${TRAIN_CMD[@]}" && key qlora-train train "$WORK/train" "$ADAPTER_REF"
	# the QLoRA adapter when it was published, else a second benchmark adapter
	if [[ ${STATUS[qlora-train]} == ok || $DRY == 1 ]]; then serve_cmd "$ADAPTER_REF,$BENCH_A"; else serve_cmd "$BENCH_B,$BENCH_A"; fi
	run_step serve-openai "${SERVE_CMD[@]}" && key serve-openai serve "$WORK/logs/serve-openai.log"
else
	for s in engine-bench qlora-train serve-openai; do skip "$s" "no base"; done
fi

((DRY)) && dry_checks

# ---------------------------------------------------------------- the table
table() {
	local s
	printf '\n%-14s| %-12s| %8s | %s\n' step status seconds key
	printf '%s\n' "--------------|-------------|----------|----------------------------------------"
	for s in "${STEPS[@]}"; do
		printf '%-14s| %-12s| %8s | %s\n' "$s" "${STATUS[$s]:-not run}" "${SECS[$s]:-0}" "${KEY[$s]:-}"
	done
	printf 'total %s s of a %s s budget; %s, %s %s, shape %s\n' "$(elapsed "$T0")" "$BUDGET" \
		"$(hostname)" "$DEVICE" "$DTYPE" "$SHAPE"
}
table | tee "$WORK/table.txt"
if [[ -n $OUT_DIR ]]; then
	mkdir -p "$OUT_DIR"
	cp "$WORK/table.txt" "$OUT_DIR/gpu_check.txt"
	for s in "${STEPS[@]}"; do printf '%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]:-not run}" "${SECS[$s]:-0}" "${KEY[$s]:-}"; done |
		"$PY" -c 'import json, sys
rows = [dict(zip(("step", "status", "seconds", "key"), line.rstrip("\n").split("\t"))) for line in sys.stdin]
print(json.dumps({"steps": rows, "argv": sys.argv[1:]}, indent=1))' "$DEVICE" "$DTYPE" "$SHAPE" >"$OUT_DIR/gpu_check.json"
	[[ -f $WORK/engine.json ]] && cp "$WORK/engine.json" "$OUT_DIR/engine.json"
	for s in "${STEPS[@]}"; do # 16 MiB a file comes back; a log's end is what matters
		[[ -f $WORK/logs/$s.log ]] && tail -c 4000000 "$WORK/logs/$s.log" >"$OUT_DIR/$s.log"
	done
fi

if ((DRY)); then
	((FAILS == 0)) && echo "dry run: all checks passed" || echo "dry run: $FAILS check(s) failed"
	((FAILS == 0))
	exit
fi
for s in "${STEPS[@]}"; do [[ ${STATUS[$s]} == ok ]] || exit 1; done
exit 0
