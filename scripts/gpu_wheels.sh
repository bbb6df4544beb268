#!/usr/bin/env bash
# Build the wheel folder that scripts/gpu_check.sh installs on a GPU machine with no network.
# Run it HERE (a machine that reaches PyPI, with Loom's dev environment), then carry the folder.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/gpu_wheels.sh [options]

Downloads, for the GPU machine's Python (default CPython 3.12, manylinux x86_64), the
wheels of every package Loom needs there that its image lacks: the closure of
loom[cuda]'s requirements plus the `openai` client, at the versions installed in
this environment (the ones the tests pass with), minus the packages the GPU image
already has (its list, read 2026-11-17, is below in this script: GPU_IMAGE).
torch is never carried unless --with-torch: the GPU image has its CUDA build.
Also copies the store's default-base tokenizer (a few MB; the 98 MB base itself
is too big to carry) into DEST/tokenizer, which the random base borrows.

Options:
  --dest DIR            where the wheels go (default: <repo>/.gpu-wheels, added to
                        .git/info/exclude so it travels only when carried)
  --python PY           interpreter whose installed versions and metadata are used
                        (default: the `python` on PATH; use the dev venv's)
  --python-version V    the GPU machine's Python (default 3.12; its image is 3.12.3)
  --with-torch          also carry torch (only if the GPU image lost its CUDA torch)
  --bnb-keep REGEX      bitsandbytes native libraries to keep (default 'cpu|cuda13',
                        the GPU image's torch is cu130); 'all' keeps the whole 41 MB wheel
  --with-loom           also build Loom's own wheel (gpu_check.sh imports the checkout's
                        src/ instead, so the code checked is the code carried)
  --force NAMES         comma-separated packages to carry even though the image has them
                        (default: typing-extensions, which pydantic needs >= 4.16)
  --store DIR           store whose default base gives the tokenizer (default: $LOOM_STORE)
  --list                print the packages that would be carried and stop
  -h, --help            this text

Then, on the device tool: carry [".gpu-wheels"], timeout_s 600,
  bash scripts/gpu_check.sh --wheels .gpu-wheels --out "$OUT"
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$REPO/.gpu-wheels"
PY=python
PYVER=3.12
WITH_TORCH=0
BNB_KEEP='cpu|cuda13'
WITH_LOOM=0
FORCE=typing-extensions
STORE_DIR=${LOOM_STORE:-}
LIST_ONLY=0
while (($#)); do
	case $1 in
	--dest) DEST=$2; shift 2 ;;
	--python) PY=$2; shift 2 ;;
	--python-version) PYVER=$2; shift 2 ;;
	--with-torch) WITH_TORCH=1; shift ;;
	--bnb-keep) BNB_KEEP=$2; shift 2 ;;
	--with-loom) WITH_LOOM=1; shift ;;
	--force) FORCE=$2; shift 2 ;;
	--store) STORE_DIR=$2; shift 2 ;;
	--list) LIST_ONLY=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) echo "gpu_wheels.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
	esac
done

# What the GPU image ('cuda', nvidia-h200) holds, as listed on 2026-11-17.
GPU_IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

# The closure of loom[cuda] + openai over this environment's installed metadata, as NAME==VERSION
# (or NAME alone where it is not installed here, e.g. bitsandbytes on a CPU machine).
closure() {
	GPU_IMAGE="$GPU_IMAGE" FORCE="$FORCE" WITH_TORCH="$WITH_TORCH" PYVER="$PYVER" PYPROJECT="$REPO/pyproject.toml" "$PY" - <<'PYEOF'
import importlib.metadata as md
import os
import re

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

image = {norm(n) for n in os.environ["GPU_IMAGE"].split()}
image -= {norm(n) for n in os.environ["FORCE"].split(",") if n}
if os.environ["WITH_TORCH"] == "1":
    image.discard("torch")
env = {"python_version": os.environ["PYVER"], "python_full_version": os.environ["PYVER"] + ".0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}

def wanted(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))

# pyproject.toml, not the installed metadata: an editable install's can lag behind it
with open(os.environ["PYPROJECT"], "rb") as fh:
    project = tomllib.load(fh)["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["cuda"] + ["openai"]
todo = [(Requirement(r), set()) for r in reqs]
seen: dict[str, str] = {}
while todo:
    req, _ = todo.pop()
    name = norm(req.name)
    if name in seen or name in image or name == "loom":
        continue
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        seen[name] = name  # not installed here: the newest matching wheel
        continue
    seen[name] = f"{name}=={dist.version}"
    for text in dist.requires or []:
        sub = Requirement(text)
        if wanted(sub, set(req.extras)):
            todo.append((sub, set(sub.extras)))
print("\n".join(sorted(seen.values())))
PYEOF
}

PKGS=$(closure)
if ((LIST_ONLY)); then
	echo "$PKGS"
	exit 0
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
case $DEST/ in
"$REPO"/*)
	if ! git -C "$REPO" check-ignore -q "$DEST"; then
		exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
		echo "/${DEST#"$REPO"/}/" >>"$exclude"
		echo "added /${DEST#"$REPO"/}/ to $exclude (it travels only when carried)"
	fi
	;;
esac

# pip matches a manylinux tag exactly, so name every glibc the GPU image's (2.39) can load
plat=()
for n in $(seq 39 -1 17); do
	plat+=(--platform "manylinux_2_${n}_x86_64")
done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in $PKGS; do
	echo "+ pip download $pkg"
	"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
		--implementation cp "${plat[@]}" -d "$DEST" "$pkg"
done

# bitsandbytes ships a native library per CUDA/ROCm/XPU version (41 MB in all); the GPU
# machine loads the one matching torch.version.cuda, and the carried tree is capped at 64 MiB.
if [[ $BNB_KEEP != all ]]; then
	for whl in "$DEST"/bitsandbytes-*.whl; do
		[[ -e $whl ]] || continue
		BNB_KEEP="$BNB_KEEP" "$PY" - "$whl" <<'PYEOF'
import os
import re
import sys
import zipfile

path = sys.argv[1]
keep = re.compile(rf"libbitsandbytes_({os.environ['BNB_KEEP']})")
with zipfile.ZipFile(path) as src:
    items = [(i, src.read(i)) for i in src.infolist()]
drop = {i.filename for i, _ in items if "libbitsandbytes_" in i.filename and not keep.search(i.filename)}
if drop:
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in items:
            if info.filename in drop:
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if x.split(",")[0] not in drop).encode()
            out.writestr(info, data)
    os.replace(tmp, path)
print(f"{os.path.basename(path)}: dropped {len(drop)} native libraries not matching '{keep.pattern}'")
PYEOF
	done
fi

if ((WITH_LOOM)); then
	echo "+ pip wheel --no-deps $REPO"
	"$PY" -m pip wheel -q --no-deps -w "$DEST" "$REPO"
fi

# The tokenizer the random base borrows (benchmarks/random_base.py --tokenizer).
TOKSRC=$(LOOM_STORE=${STORE_DIR:-${LOOM_STORE:-}} PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
from loom.models.loading import plan_load
print(plan_load(None, verify=False).base_path)') || {
	echo "gpu_wheels.sh: no default base in the store (${STORE_DIR:-\$LOOM_STORE}) to take the tokenizer" \
		"from; run 'loom store import-base --default' or pass --store DIR" >&2
	exit 1
}
mkdir -p "$DEST/tokenizer"
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
	[[ -f $TOKSRC/$f ]] && install -m 644 "$TOKSRC/$f" "$DEST/tokenizer/"
done
echo "tokenizer from $TOKSRC -> $DEST/tokenizer"

size_kb=$(du -sk "$DEST" | cut -f1)
echo "$(find "$DEST" -name '*.whl' | wc -l) wheels + tokenizer in $DEST: $((size_kb / 1024)) MiB"
if ((size_kb > 56 * 1024)); then
	echo "warning: over 56 MiB; with the working tree it may pass the device tool's 64 MiB" >&2
fi
