#!/usr/bin/env bash
# One-call GPU session for a lent GPU machine (no network there). From the repo root:
#
#     bash scripts/gpu_session.sh                 # all steps, under ~9 minutes
#     GK_STEPS="build bench" bash scripts/gpu_session.sh      # a subset (names below)
#
# Steps, in order; each runs under `timeout`, a failing step does not stop the next ones, and
# every step's exit code and duration go to the summary:
#   env       nvidia-smi, python / torch / triton / numpy versions, nvcc, compute-sanitizer, git rev
#   build     pip install --no-build-isolation --no-deps -e . with GUIDANCE_KERNELS_FORCE_BUILD=1
#             and GUIDANCE_KERNELS_CUDA_ARCHS=${GK_CUDA_ARCHS:-90a}; then imports guidance_kernels._C
#   test      pytest on the GPU: the kernel test files in full (their unmarked tests run on CUDA
#             tensors when a GPU is present) plus every @pytest.mark.gpu test; junit XML
#   memcheck  compute-sanitizer --tool memcheck on scripts/cuda_memcheck_driver.py (the CUDA
#             backend's four primitives on small awkward layers, checked against fp64)
#   bench     guidance-kernels bench --device cuda --dtype bf16 (full shapes), with --time-limit
#             so that it writes its JSON / CSV / PNG with whatever it measured in time
#
# Everything goes to ${OUT:-./gpu_out} (at most 6 files, the device tool returns 8):
#   session.log  every step's output        junit.xml   the pytest run
#   summary.txt  one line per step (rc, s) plus the pytest and bench verdicts
#   DATE_GPU.json / .csv / .png             the bench (GPU = h100, h200, ... from the device name)
#
# Knobs (environment): OUT, PYTHON (default python3), GK_STEPS, GK_DEADLINE_S (whole-script
# budget, default 530 s), GK_CUDA_ARCHS (default 90a), GK_TEST_ARGS (replaces the pytest
# selection), GK_BENCH_ARGS (extra bench arguments, e.g. "-w W1 -w W3"),
# GK_T_BUILD / GK_T_TEST / GK_T_MEMCHECK (per-step caps in seconds; the bench gets what is left).
# The script exits 0 when every step that ran exited 0, else 1.

set -uo pipefail # deliberately no -e: every step runs and records its exit code
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEPS="${GK_STEPS:-env build test memcheck bench}"
DEADLINE_S="${GK_DEADLINE_S:-530}"
ARCHS="${GK_CUDA_ARCHS:-90a}"
T_BUILD="${GK_T_BUILD:-240}"
T_TEST="${GK_T_TEST:-210}"
T_MEMCHECK="${GK_T_MEMCHECK:-90}"
LOG="$OUT/session.log"
SUMMARY="$OUT/summary.txt"
JUNIT="$OUT/junit.xml"
export PYTHONUNBUFFERED=1
: >"$LOG"
T0=$(date +%s)
RESULTS=()
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - T0)); }
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME CAP_S CMD...: runs CMD (a bash -c string) under timeout min(CAP, time left - 15).
# SIGINT first (pytest and the bench then end cleanly and still write their reports), SIGKILL 20 s
# later. Records "NAME rc=.. s=..".
run_step() {
    local name=$1 cap=$2 cmd=$3
    local left=$((DEADLINE_S - $(elapsed) - 15))
    local lim=$((cap < left ? cap : left))
    if ((lim < 10)); then
        RESULTS+=("$(printf '%-9s rc=-   s=0    skipped: %s s of the %s s budget left' "$name" "$((DEADLINE_S - $(elapsed)))" "$DEADLINE_S")")
        say "=== $name: skipped (no time left)"
        return
    fi
    say ""
    say "=== $name (limit ${lim}s, t=$(elapsed)s): $(echo "$cmd" | tr -s ' \n' ' ' | cut -c1-300)"
    local s0 rc
    s0=$(date +%s)
    timeout -s INT -k 20 "$lim" bash -c "$cmd" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local dt=$(($(date +%s) - s0))
    local note=""
    ((rc == 124 || rc == 137)) && note="  (hit its ${lim}s limit)"
    ((rc != 0)) && FAILED=1
    RESULTS+=("$(printf '%-9s rc=%-3s s=%-4s%s' "$name" "$rc" "$dt" "$note")")
    say "=== $name: rc=$rc after ${dt}s$note"
}

# -------------------------------------------------------------------------------------- env
if has_step env; then
    run_step env 60 "
        date -u +'%F %T UTC'; uname -a; nproc; free -g | head -2
        echo '--- git'; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
        echo '--- nvidia-smi'; nvidia-smi || echo 'nvidia-smi failed'
        echo '--- python'; command -v $PY; $PY - <<'EOF'
import platform, sys
print('python', platform.python_version(), sys.executable)
try:
    import torch
    print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print('device', p.name, 'cc', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count,
              'mem GiB', round(p.total_memory / 2**30, 1))
except Exception as e:
    print('torch import failed:', e)
for mod in ('triton', 'numpy', 'pytest', 'typer', 'rich', 'matplotlib', 'sklearn', 'pybind11', 'ninja', 'pytest_timeout'):
    try:
        m = __import__(mod)
        print(mod, getattr(m, '__version__', '?'))
    except Exception as e:
        print(mod, 'MISSING', type(e).__name__)
EOF
        echo '--- nvcc'; nvcc --version || echo 'no nvcc on PATH'
        echo '--- compute-sanitizer'; command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo 'none on PATH'
    "
fi

# -------------------------------------------------------------------------------------- build
if has_step build; then
    run_step build "$T_BUILD" "
        export GUIDANCE_KERNELS_FORCE_BUILD=1 GUIDANCE_KERNELS_CUDA_ARCHS='$ARCHS'
        export MAX_JOBS=\${MAX_JOBS:-\$(nproc)} NVCC_THREADS=\${NVCC_THREADS:-2}
        time $PY -m pip install --no-build-isolation --no-deps -v -e . || exit 1
        $PY -c 'import guidance_kernels._C as C, guidance_kernels.backends.cuda as cb, torch; print(\"extension:\", C.__file__, \"ROW_SHIFTED =\", getattr(C, \"ROW_SHIFTED\", None)); print(\"backend cuda:\", cb.available(torch.device(\"cuda\")) or \"available\")'
    "
fi

# -------------------------------------------------------------------------------------- test
if has_step test; then
    # The kernel files in full (on a GPU their unmarked tests run on CUDA tensors: Triton kernels
    # compiled for the device, opcheck, torch.compile) and every @pytest.mark.gpu test anywhere.
    # conftest.py skips gpu tests only when torch.cuda.is_available() is False; the CUDA backend's
    # gpu tests also need the built extension (step build). -rs lists every skip with its reason.
    tmo=""
    $PY -c 'import pytest_timeout' 2>/dev/null && tmo="--timeout=150"
    pt="$PY -m pytest -q -p no:cacheprovider -rfEs $tmo"
    if [ -n "${GK_TEST_ARGS:-}" ]; then
        run_step test "$T_TEST" "$pt --junitxml='$JUNIT' $GK_TEST_ARGS"
    else
        files="tests/test_cuda_backend.py tests/test_cuda_host_checks.py tests/test_triton_backend.py tests/test_triton_large_offset.py tests/test_op_gram.py tests/test_op_cross.py tests/test_op_gram_stats.py tests/test_op_procrustes.py tests/test_ops.py tests/test_gradcheck.py"
        ign=$(for f in $files; do printf -- '--ignore=%s ' "$f"; done)
        run_step test "$T_TEST" "
            $pt --junitxml='$JUNIT' $files
            rc1=\$?
            echo '--- gpu-marked tests in the other files'
            $pt -m gpu $ign tests
            rc2=\$?
            [ \$rc2 -eq 5 ] && rc2=0  # none there: fine
            exit \$(( rc1 != 0 ? rc1 : rc2 ))
        "
    fi
fi

# -------------------------------------------------------------------------------------- memcheck
if has_step memcheck; then
    run_step memcheck "$T_MEMCHECK" "
        CS=\$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
        if [ -z \"\$CS\" ] && command -v nvcc >/dev/null; then
            CS=\$(dirname \"\$(readlink -f \"\$(command -v nvcc)\")\")/compute-sanitizer; [ -x \"\$CS\" ] || CS=
        fi
        [ -n \"\$CS\" ] || { echo 'compute-sanitizer not found'; exit 3; }
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"\$CS\" --tool memcheck --error-exitcode 99 --print-limit 20 \
            $PY scripts/cuda_memcheck_driver.py
    "
fi

# -------------------------------------------------------------------------------------- bench
BENCH_JSON=""
if has_step bench; then
    gpu=$($PY -c 'import torch; n = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else "nogpu"
import re; m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", n); print(m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", n).strip("-"))' 2>/dev/null || echo unknown)
    BENCH_JSON="$OUT/$(date +%F)_${gpu}.json"
    # the bench stops starting rows 60 s before its timeout (one row can take that long: compile)
    left=$((DEADLINE_S - $(elapsed) - 15))
    run_step bench "$left" "
        $PY -m guidance_kernels bench --device cuda --dtype bf16 --time-limit $((left > 120 ? left - 60 : left / 2)) \
            --out '$BENCH_JSON' --markdown ${GK_BENCH_ARGS:-}
    "
fi

# -------------------------------------------------------------------------------------- summary
{
    echo "gpu_session $(date -u +'%F %T UTC'), total $(elapsed) s of a ${DEADLINE_S} s budget; steps: $STEPS"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        echo "commit $(git rev-parse --short HEAD)$(git status --short 2>/dev/null | grep -q . && echo ' + local changes')"
    else
        echo "commit: unknown (no .git in this copy of the tree)"
    fi
    $PY -c 'import torch, platform; print("python", platform.python_version(), "torch", torch.__version__, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>/dev/null
    for r in "${RESULTS[@]}"; do echo "$r"; done
    if [ -f "$JUNIT" ]; then
        $PY - "$JUNIT" <<'EOF'
import collections, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("pytest: {tests} tests, {failures} failed, {errors} errors, {skipped} skipped".format(**tot))
bad = []
for s in suites:
    for c in s.iter("testcase"):
        for kind in ("failure", "error"):
            e = c.find(kind)
            if e is not None:
                msg = (e.get("message") or "").splitlines()[0][:160] if e.get("message") else ""
                bad.append(f"  {kind.upper()} {c.get('classname')}::{c.get('name')}: {msg}")
if bad:
    print("\n".join(bad[:30]))
skips = collections.Counter()
for s in suites:
    for c in s.iter("testcase"):
        e = c.find("skipped")
        if e is not None:
            skips[(e.get("message") or "")[:140]] += 1
for msg, k in skips.most_common(8):
    print(f"  skipped x{k}: {msg}")
EOF
    fi
    if has_step memcheck; then
        grep -E "^cuda_memcheck_driver|max rel err|MISMATCH|ERROR SUMMARY|compute-sanitizer not found" "$LOG" | grep -v "^===" | sed 's/^/  memcheck: /'
    fi
    if [ -n "$BENCH_JSON" ] && [ -f "$BENCH_JSON" ]; then
        $PY - "$BENCH_JSON" <<'EOF'
import collections, json, sys
r = json.load(open(sys.argv[1]))
st = collections.Counter(x["status"] for x in r["records"])
print(f"bench: {sys.argv[1]} ({r['meta']['device_name']}, wall {r['meta']['wall_s']:.0f} s):",
      ", ".join(f"{v} {k}" for k, v in sorted(st.items())))
late = sum("time limit" in (x.get("reason") or "") for x in r["records"])
if late:
    print(f"  {late} rows not started before --time-limit: run the bench again (docs/cuda.md, GPU session)")
for x in r["records"]:
    if x["status"] in ("wrong", "error"):
        print(f"  {x['status'].upper()} {x['workload']} {x['impl']} {x['mode']}: {x.get('reason', '')[:160]}")
rows = collections.defaultdict(dict)
for x in r["records"]:
    if x["status"] == "ok":
        rows[(x["workload"], x["mode"])][x["impl"]] = x
show = ("gk:cuda", "gk:triton", "gk:reference", "eager", "torch.compile")
print("  median ms (% floor) per workload and mode:")
for (w, m), d in rows.items():
    cells = [f"{i.removeprefix('gk:')} {d[i]['median_s'] * 1e3:.3g} ({d[i]['pct_floor']:.0f}%)" for i in show if i in d]
    print(f"  {w:16s} {m:8s} " + " | ".join(cells))
print("  e2e step: " + " | ".join(
    f"{e['variant']} {e['median_s'] * 1e3:.3g} ms" if e.get("status") == "ok" else f"{e['variant']} {e.get('status')}"
    for e in r.get("e2e", [])))
EOF
    elif [ -n "$BENCH_JSON" ]; then
        echo "bench: no JSON written ($BENCH_JSON); per-row timings are in session.log"
    fi
} >"$SUMMARY" 2>&1
echo ""
echo "================================ summary ($SUMMARY)"
cat "$SUMMARY"
cat "$SUMMARY" >>"$LOG"
exit "$FAILED"
