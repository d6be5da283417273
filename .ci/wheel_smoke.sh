#!/usr/bin/env bash
# The installable wheel, as a new user gets it: build it, install it NON-editable with its core dependencies only
# (no extras) into a fresh venv, and from outside the checkout (so nothing is imported from the source tree) run
# the verbs, the main job, and runtime.load of the emitted module with one attention call (CPU fallback).
#
#   .ci/wheel_smoke.sh            # from anywhere; PYTHON (python3) and TORCH (torch==2.13.0) may be overridden
#   SPARVAR_SMOKE_KEEP=1 .ci/...  # keep the temporary directory (venv, wheel, module) for a look afterwards
#
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sparvar-wheel-smoke.XXXXXX")"
START=$SECONDS

cleanup() {
    local rc=$?
    if [ "${SPARVAR_SMOKE_KEEP:-0}" = 1 ]; then
        echo "wheel smoke: kept $WORK"
    else
        echo "wheel smoke: removing $WORK"
        rm -rf "$WORK"
    fi
    if [ $rc -ne 0 ]; then
        echo "wheel smoke: FAILED (exit $rc) after $((SECONDS - START)) s" >&2
    fi
}
trap cleanup EXIT

step() { echo; echo "== wheel smoke [$((SECONDS - START)) s]: $*"; }
# pip, minus one warning per package that a configured local index directory lacks (harmless, and many).
pip_() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# ------------------------------------------------------------------------------------------------ build
step "copy the source tree (tracked and untracked, not ignored) so the build writes nothing into the checkout"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    cp -r "$ROOT/." "$WORK/src/"
    rm -rf "$WORK/src/.venv" "$WORK/src/build" "$WORK/src/dist"
fi

step "build the wheel (pip wheel --no-deps)"
pip_ "$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/sparvar_compiler-*.whl)"
echo "built $(basename "$WHEEL"): $(du -h "$WHEEL" | cut -f1), $("$PYTHON" -m zipfile -l "$WHEEL" | tail -n +2 | wc -l) files"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["sparvar_compiler/cs4a/__init__.py", "sparvar_compiler/fidelity/__init__.py",
        "sparvar_compiler/tuning_db/sparvar.sqlite"]
missing = [n for n in need if n not in names]
missing += [] if any(n.startswith("sparvar_compiler/templates/triton/") and n.endswith(".jinja") for n in names) \
    else ["sparvar_compiler/templates/triton/*.jinja"]
missing += [] if any(n.endswith(".dist-info/licenses/LICENSE") for n in names) else ["*.dist-info/licenses/LICENSE"]
if missing:
    sys.exit(f"the wheel lacks {missing}")
print("wheel holds the sub-packages, templates, shipped database and LICENSE")
EOF

# ------------------------------------------------------------------------------------------------ install
step "fresh venv; $TORCH first, then the wheel with core dependencies only"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
pip_ "$VPY" -m pip install -q --upgrade pip
pip_ "$VPY" -m pip install -q "$TORCH"
echo "$TORCH" > "$WORK/constraints.txt"    # keeps the resolver off any other torch
pip_ "$VPY" -m pip install -q -c "$WORK/constraints.txt" "$WHEEL"
"$VPY" -m pip check
echo "core venv: $(du -sh "$WORK/venv" | cut -f1)"

# Run as a new user would: outside the checkout, no PYTHONPATH, private caches, no database URL from the caller.
mkdir -p "$WORK/run" "$WORK/cache"
cd "$WORK/run"
unset PYTHONPATH SPARVAR_DB
export XDG_CACHE_HOME="$WORK/cache" TRITON_CACHE_DIR="$WORK/cache/triton" MPLBACKEND=Agg
SC="$WORK/venv/bin/sparvar-compile"

"$VPY" - <<'EOF'
import importlib.util, sys
extras = [m for m in ("tvm", "psycopg", "matplotlib") if importlib.util.find_spec(m)]
if extras:
    sys.exit(f"a core install should not have {extras}")
import sparvar_compiler
print(f"no extras installed; sparvar_compiler from {sparvar_compiler.__file__}")
EOF

# ------------------------------------------------------------------------------------------------ verbs
MOD="$WORK/out/infinity-8b-h100"
step "sparvar-compile --help";                 "$SC" --help >/dev/null
step "sparvar-compile --version";              "$SC" --version
step "sparvar-compile models / gpus";          "$SC" models >/dev/null; "$SC" gpus >/dev/null
step "sparvar-compile plan --model infinity-8b"; "$SC" plan --model infinity-8b >/dev/null
step "main job: sparvar-compile --model infinity-8b --gpu h100 -o $MOD"
"$SC" --model infinity-8b --gpu h100 -o "$MOD" | tail -n 3
step "sparvar-compile verify";                 "$SC" verify "$MOD"
step "sparvar-compile inspect";                "$SC" inspect "$MOD" >/dev/null
step "sparvar-compile db stats / db export";   "$SC" db stats >/dev/null; "$SC" db export "$WORK/winners.json" >/dev/null
step "sparvar-compile doctor";                 "$SC" doctor >/dev/null
step "sparvar-compile fidelity --help";        "$SC" fidelity --help >/dev/null
step "sparvar-compile fidelity (synthetic, var-d16)"
"$SC" fidelity --model var-d16 --synthetic local -o "$WORK/fidelity" >/dev/null
test -s "$WORK/fidelity/fidelity.json"
step "sparvar-compile calibrate (synthetic, var-d16, 3 trials)"
"$SC" calibrate --model var-d16 --synthetic local --trials 3 -o "$WORK/calibrated.yaml" >/dev/null
test -s "$WORK/calibrated.yaml"
step "sparvar-compile tune, bundle runner (var-d16, 1 trial: builds the candidates here)"
"$SC" tune --model var-d16 --gpu h100 --runner bundle --bundle "$WORK/bundle" --trials 1 \
    --db "$WORK/tune.sqlite" >/dev/null
test -s "$WORK/bundle/bundle.json"

# ------------------------------------------------------------------------------------------------ runtime
step "runtime.load + one attention call at the last scale, last layer (CPU fallback)"
"$VPY" "$ROOT/.ci/wheel_smoke.py" "$MOD" "$ROOT"

step "passed in $((SECONDS - START)) s"
