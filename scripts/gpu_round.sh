#!/usr/bin/env bash
# One GPU session's runs (docs/benchmarks.md §11), so that each `run` of the device tool
# is one short command and the order and limits are written down, not retyped.
#
#   scripts/gpu_round.sh STEP [STEP ...]
#
# Steps (each with its own time limit, so one that hangs or fails leaves the next to run;
# each writes its log and results under $OUT/<step>/, which the device tool brings back):
#   stage1    copy .devstage/part1's wheels to /root/wh (carry .devstage/part1)
#   stage2    copy .devstage/part2's, install Ray Serve, tritonclient, orjson and
#             perf_analyzer (carry .devstage/part2 and .whl)
#   modes     bench_modes, ResNet-18 b4 and ResNet-50 b32 (issue 14: pool <= static + 2%)
#   enginetests   the GPU tests of the issues' targets that need no Ray (pool engine,
#             PyTorch engine, groups' paging; ENGINE_TESTS_MORE adds more files)
#   serving   bench_serving: perf_analyzer HTTP/gRPC vs the in-process ceiling (issue 14)
#   paths     bench_serving's call path (replica stages, handle transport), Serve's defaults
#             and Serve's replica gRPC transport (issue 14: where the per-call time goes)
#   embed     serving's full table with the image model inside the ingress (args.embed), past the proxy
#   embedsep  embed's binary rows with the ingress on Serve's second loop (Serve's default)
#   embedproxy    the same through Serve's proxy (HTTP binary and gRPC, concurrency 1 and 16)
#   path1     paths' first run alone, for a short window
#   pathsd    paths-default, then paths-direct (Serve's defaults; past the proxy)
#   paths2    the same with Serve's direct ingress (past the proxy), then 4 ingress and 2 model
#             replicas (what more processes buy)
#   servetests    the GPU tests through Serve (groups' replica memory, mechanism)
#   groups    bench_density --system ebb-groups --group-serve on a 6 GiB card (issue 13)
#   plain / ebb   bench_density for one system on the same 6 GiB card (issue 13)
set -u
: "${OUT:=./out}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

quiet_card() {  # wait (at most 60 s) until no process of an earlier step holds the card
    local i
    for i in $(seq 120); do
        [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && return 0
        sleep 0.5
    done
    echo "== still on the card after 60 s: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader | tr '\n' ' ')"
}

serve_tail() {  # one file with the end of each Serve replica log, where a step failed
    local out=$1 f
    for f in /tmp/ray/session_latest/logs/serve/replica_*.log; do
        [ -f "$f" ] || continue
        echo "==== $f"
        grep -n -A12 -E "Traceback|Error|error" "$f" | tail -n 80
    done >"$out" 2>/dev/null
}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    mkdir -p "$OUT/$name"
    # A step that starts while the last one's replicas are still leaving measures them
    # too (the first groups run of 2026-12-07 began 7 s after a cluster went down).
    quiet_card
    echo "== $name: $* (start $(date -u +%T))"
    # Which process is busy while the client's rate flattens (the rate setter).
    python3 scripts/cpu_sampler.py --out "$OUT/$name/cpu.json" >"$OUT/$name/cpu.txt" 2>&1 &
    local sampler=$!
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name/log.txt" 2>&1
    local rc=$?
    kill -TERM "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    echo "== $name: rc=$rc (end $(date -u +%T))"
    if [ "$rc" -ne 0 ] || grep -q -E "failed: |Traceback" "$OUT/$name/log.txt"; then
        serve_tail "$OUT/$name/serve-errors.txt"
    fi
    tail -n "${TAIL_LINES:-25}" "$OUT/$name/log.txt"
    head -n 12 "$OUT/$name/cpu.txt"
}

for s in "$@"; do
    case "$s" in
    stage1)
        mkdir -p /root/wh && cp .devstage/part1/*.whl /root/wh/ && echo "stage1: $(ls /root/wh | wc -l) wheels"
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv ;;
    stage2)
        mkdir -p /root/wh && cp .devstage/part2/*.whl /root/wh/ &&
            python3 -m pip install -q --no-index --find-links /root/wh "ray[serve]==2.60.0" \
                "tritonclient[http,grpc]==2.73.0" "orjson==3.13.0" &&
            python3 -m pip install -q --no-deps .whl/perf_analyzer-*.whl &&
            ray get-auth-token --generate >/dev/null 2>&1
        python3 -c "import ray, tritonclient.grpc, orjson; print('ray', ray.__version__)" ;;
    modes)
        step modes 300 python3 scripts/bench_modes.py --models resnet18-b4 resnet50-b32 --out-dir "$OUT/modes" ;;
    enginetests)
        step enginetests 300 python3 -m pytest -m gpu -s -p no:cacheprovider tests/gpu/test_pool_engine_gpu.py \
            tests/gpu/test_pytorch_gpu.py tests/gpu/test_groups_gpu.py ${ENGINE_TESTS_MORE:-} ;;
    serving)
        step serving 330 python3 scripts/bench_serving.py --concurrency 1,16,64 --measurement-ms 1500 \
            --small-calls 150 --out-dir "$OUT/serving" ;;
    embed)
        # The image model inside the ingress replica (args.embed), reached past the proxy
        # (direct ingress): no hop between client, protocol and engine. The full table.
        step embed 330 python3 scripts/bench_serving.py --embed --direct-ingress --concurrency 1,16,64 \
            --measurement-ms 1500 --small-calls 150 --out-dir "$OUT/embed" ;;
    embedsep)
        # embed's HTTP binary and gRPC rows with the ingress on Serve's second event loop
        # (Serve's default): what running it on Serve's own loop buys on the card.
        step embedsep 240 python3 scripts/bench_serving.py --embed --direct-ingress --separate-loop \
            --protocols http-binary,grpc --concurrency 1,16 --measurement-ms 1500 --no-small \
            --out-dir "$OUT/embedsep" ;;
    embedproxy)
        # The same through Serve's proxy (one hop: proxy to the embedding ingress).
        step embedproxy 240 python3 scripts/bench_serving.py --embed --protocols http-binary,grpc \
            --concurrency 1,16 --measurement-ms 1500 --no-small --out-dir "$OUT/embedproxy" ;;
    path1)
        # paths' first half alone, for a short window.
        step paths-default 200 python3 scripts/bench_serving.py --protocols grpc,http-binary --concurrency 1,16 \
            --measurement-ms 1500 --no-small --out-dir "$OUT/paths-default" ;;
    paths)
        # The serving path's pieces (replica stages, handle transport) with Serve's
        # defaults, then with its replica gRPC transport (by value) for handles and the proxy.
        step paths-default 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --out-dir "$OUT/paths-default"
        step paths-grpc 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --serve-env RAY_SERVE_USE_GRPC_BY_DEFAULT=1 \
            --serve-env RAY_SERVE_PROXY_USE_GRPC=1 --out-dir "$OUT/paths-grpc" ;;
    pathsd)
        # Serve's defaults, then past the proxy (direct ingress): one window's worth.
        step paths-default 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --out-dir "$OUT/paths-default"
        step paths-direct 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --direct-ingress --out-dir "$OUT/paths-direct" ;;
    paths2)
        # Past the proxy (Serve's direct ingress, one ingress replica), then more processes.
        step paths-direct 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --direct-ingress --out-dir "$OUT/paths-direct"
        step paths-wide 240 python3 scripts/bench_serving.py --protocols http-binary,grpc --concurrency 1,16 \
            --measurement-ms 1500 --no-small --ingress-replicas 4 --model-replicas 2 --out-dir "$OUT/paths-wide" ;;
    servetests)
        step servetests 240 python3 -m pytest -m gpu -s -p no:cacheprovider tests/gpu/test_serve_groups_gpu.py \
            tests/gpu/test_mechanism_gpu.py ;;
    groups)
        step groups 420 python3 scripts/bench_density.py --system ebb-groups --group-serve --card-gib 6 \
            --out-dir "$OUT/groups" ;;
    plain)
        step plain "${DENSITY_LIMIT_S:-560}" python3 scripts/bench_density.py --system plain --card-gib 6 \
            --max-replicas "${PLAIN_MAX:-5}" --measure-s 5 --out-dir "$OUT/plain" ;;
    ebb)
        step ebb "${DENSITY_LIMIT_S:-560}" python3 scripts/bench_density.py --system ebb --card-gib 6 \
            --max-replicas "${EBB_MAX:-8}" --measure-s 5 --out-dir "$OUT/ebb" ;;
    *) echo "unknown step: $s" >&2; exit 2 ;;
    esac
done
