#!/usr/bin/env bash
# Build the TensorRT engines this bundle's Triton and DeepStream configs point at, ON the device
# that will run them: an engine is bound to the GPU (or DLA) and the TensorRT version that built it.
#
# usage: ./build_engine.sh [--only NAME] [--dla CORE [--allow-gpu-fallback]] [--force] [--list]
#   --only NAME            build one engine of engines.tsv (see --list)
#   --dla CORE             build the DLA-capable engines (DeepStream's) on DLA core CORE, batch 1
#   --allow-gpu-fallback   let layers DLA cannot run fall back to the GPU; how many did is reported
#   --force                rebuild engines that exist
#   --list                 print the engines this bundle needs, and exit
# environment: TRTEXEC (the trtexec to use), TRT_VERSION (skip detecting it), PYTHON (for
# modelopt's AutoCast, which FP16 needs on TensorRT 11)
#
# TensorRT 8.x/10.x: FP16 is the --fp16 builder flag on the FP32 graph; an INT8 Q/DQ graph builds
# strongly typed (--stronglyTyped on 10.x; --int8 on 8.x, which has no strong typing). TensorRT 11
# removed every precision flag: networks are always strongly typed, so an FP16 engine needs an FP16
# graph (modelopt AutoCast), and INT8 comes only from a Q/DQ graph. DLA: up to TensorRT 10.7 and
# again from 11.4.1 (JetPack 7.2.2+); FP16/INT8 only, static shapes. Every build shares a timing
# cache named after this device and TensorRT version, so rebuilds are fast and never mix devices.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

only="" dla_core="" allow_fallback=0 force=0 list=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="${2:?--only needs an engine name (see --list)}"; shift 2 ;;
    --dla) dla_core="${2:?--dla needs a DLA core number, e.g. --dla 0}"; shift 2 ;;
    --allow-gpu-fallback) allow_fallback=1; shift ;;
    --force) force=1; shift ;;
    --list) list=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_engine.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "build_engine.sh: $*" >&2; exit 2; }

[ -f engines.tsv ] || die "engines.tsv is missing: this is not a complete rise-edge bundle"
if [ "$list" = 1 ]; then
  grep -v '^#' engines.tsv | cut -f1,2,3,4
  exit 0
fi
if [ "$allow_fallback" = 1 ] && [ -z "$dla_core" ]; then
  die "--allow-gpu-fallback only means something with --dla CORE"
fi

find_trtexec() {
  if [ -n "${TRTEXEC:-}" ]; then echo "$TRTEXEC"; return 0; fi
  if command -v trtexec >/dev/null 2>&1; then command -v trtexec; return 0; fi
  if [ -x /usr/src/tensorrt/bin/trtexec ]; then echo /usr/src/tensorrt/bin/trtexec; return 0; fi
  return 1
}
trtexec="$(find_trtexec)" || die "trtexec not found: put it on PATH or set TRTEXEC (JetPack: /usr/src/tensorrt/bin/trtexec)"

# "10.3.0": TRT_VERSION, else trtexec's banner "[TensorRT v100300]" (10.x and later encode
# major*10000 + minor*100 + patch, 8.x major*1000 + minor*100 + patch), else the Python package.
tensorrt_version() {
  if [ -n "${TRT_VERSION:-}" ]; then echo "$TRT_VERSION"; return 0; fi
  local code
  code="$("$trtexec" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
  if [ -n "$code" ]; then
    if [ "$code" -ge 100000 ]; then
      echo "$((code / 10000)).$((code / 100 % 100)).$((code % 100))"
    else
      echo "$((code / 1000)).$((code / 100 % 10)).$((code % 100))"
    fi
    return 0
  fi
  "${PYTHON:-python3}" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null
}
version="$(tensorrt_version)" || die "cannot tell which TensorRT $trtexec is; set TRT_VERSION=10.3.0 (say)"
IFS=. read -r major minor patch _ <<<"$version.0.0"
echo "TensorRT $version ($trtexec)"

dla_supported() {
  if [ "$major" -lt 10 ]; then return 0; fi
  if [ "$major" -eq 10 ]; then [ "$minor" -le 7 ]; return; fi
  if [ "$major" -eq 11 ]; then [ "$minor" -gt 4 ] || { [ "$minor" -eq 4 ] && [ "$patch" -ge 1 ]; }; return; fi
  return 0
}
if [ -n "$dla_core" ] && ! dla_supported; then
  die "TensorRT $version has no DLA (10.7 was the last 10.x with it; 11.4.1 brought it back on JetPack 7.2.2+); build without --dla"
fi

# What the engine is bound to: the device's name and the TensorRT version.
device_name() {
  if [ -r /proc/device-tree/model ]; then tr -d '\0' </proc/device-tree/model; return 0; fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1; return 0; fi
  uname -m
}
device="$(device_name)"
tag="$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | tr '[:upper:]' '[:lower:]' | sed 's/^-//; s/-$//')-trt$version"
mkdir -p cache logs
timing_cache="cache/timing-$tag.cache"

# What to record beside latency figures: they mean little without the power mode and clocks.
{
  echo "device: $device"
  echo "tensorrt: $version"
  if [ -r /etc/nv_tegra_release ]; then echo "l4t: $(head -n 1 /etc/nv_tegra_release)"; fi
  if command -v nvpmodel >/dev/null 2>&1; then echo "nvpmodel: $(nvpmodel -q 2>/dev/null | tr '\n' ' ')"; fi
  if command -v jetson_clocks >/dev/null 2>&1; then
    echo "jetson_clocks --show (needs root): $(jetson_clocks --show 2>&1 | tr '\n' ' ' | cut -c1-400)"
  fi
  echo "recorded: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >device-record.txt

# The graphs must be the ones packaged (a truncated copy builds a wrong engine or none); the
# configs are not checked, since enabling DLA in nvinfer's means editing it.
if command -v sha256sum >/dev/null 2>&1 && [ -f SHA256SUMS ]; then
  grep '\.onnx$' SHA256SUMS | sha256sum --quiet -c - ||
    die "graphs differ from SHA256SUMS: copy the bundle to this device again"
fi

autocast_fp16() {  # TensorRT 11: an FP16 engine needs an FP16 graph
  local src="$1" out
  out="cache/$(basename "${1%.onnx}").fp16-autocast.onnx"
  if [ ! -f "$out" ] || [ "$force" = 1 ]; then
    # --keep_io_types: the graph keeps FP32 inputs and outputs, as the configs declare them
    "${PYTHON:-python3}" -m modelopt.onnx.autocast --onnx_path "$src" --output_path "$out" \
      --low_precision_type fp16 --keep_io_types >&2 ||
      { echo "FP16 on TensorRT $version needs modelopt's AutoCast: pip install nvidia-modelopt[onnx] (or build the FP32 or INT8 engine)" >&2; return 1; }
  fi
  echo "$out"
}

build_one() {  # name onnx engine precision input chw batch_min batch_opt batch_max dla_capable
  local name="$1" onnx="$2" engine="$3" precision="$4" input="$5" chw="$6"
  local low="$7" opt="$8" high="$9" dla_capable="${10}"
  local use_dla=0 fell_back=0 args log tmp
  [ -f "$onnx" ] || { echo "$name: $onnx is missing" >&2; return 1; }
  if [ -n "$dla_core" ] && [ "$dla_capable" = 1 ]; then use_dla=1; fi
  if [ -f "$engine" ] && [ "$force" = 0 ]; then
    echo "$name: $engine exists (--force rebuilds it)"
    return 0
  fi
  if [ "$use_dla" = 1 ]; then
    [ "$precision" != fp32 ] || { echo "$name: DLA runs FP16 and INT8 only, not FP32" >&2; return 1; }
    low="$opt" high="$opt"  # DLA takes no dynamic shapes
  fi
  if [ "$major" -ge 11 ] && [ "$precision" = fp16 ]; then
    onnx="$(autocast_fp16 "$onnx")" || return 1
  fi
  tmp="$(dirname "$engine")/.$(basename "$engine").tmp"
  args=("--onnx=$onnx" "--saveEngine=$tmp" "--timingCacheFile=$timing_cache"
        "--minShapes=$input:${low}x$chw" "--optShapes=$input:${opt}x$chw" "--maxShapes=$input:${high}x$chw")
  if [ "$major" -lt 11 ]; then
    case "$precision" in
      fp16) args+=(--fp16) ;;
      int8)
        if [ "$major" -lt 10 ]; then
          args+=(--int8)                 # 8.x: Q/DQ read as explicit quantization
        elif [ "$use_dla" = 1 ]; then
          args+=(--int8 --fp16)          # 10.x DLA takes no strongly typed network
        else
          args+=(--stronglyTyped)        # the Q/DQ graph's types decide every precision
        fi
        ;;
    esac
  fi
  if [ "$use_dla" = 1 ]; then
    args+=("--useDLACore=$dla_core")
    if [ "$allow_fallback" = 1 ]; then
      args+=(--allowGPUFallback)
      echo "$name: WARNING: GPU fallback allowed; layers DLA cannot run will run on the GPU (counted below)"
    fi
  fi
  log="logs/$name.build.log"
  mkdir -p "$(dirname "$engine")"
  echo "$name: $trtexec ${args[*]}"
  if ! "$trtexec" "${args[@]}" >"$log" 2>&1; then
    rm -f "$tmp"
    echo "$name: trtexec failed; its log: $here/$log" >&2
    return 1
  fi
  [ -s "$tmp" ] || { echo "$name: trtexec wrote no engine; its log: $here/$log" >&2; return 1; }
  mv -f "$tmp" "$engine"
  if [ "$use_dla" = 1 ]; then
    fell_back="$(grep -c 'falling back to GPU' "$log" || true)"
    echo "$name: DLA core $dla_core; $fell_back layer(s) fell back to the GPU"
    if [ "$name" = deepstream ]; then
      echo "$name: nvinfer needs enable-dla=1 and use-dla-core=$dla_core in deepstream/config_infer_primary.txt"
    fi
  fi
  {
    echo "engine: $engine"
    echo "built_from: $onnx"
    echo "precision: $precision"
    echo "tensorrt: $version"
    echo "device: $device"
    echo "dla_core: ${dla_core:-none}"
    echo "gpu_fallback_layers: $fell_back"
    echo "trtexec: ${args[*]}"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"logs/$name.build.txt"
  echo "$name: wrote $engine"
}

failed=()
built=0
while IFS=$'\t' read -r name onnx engine precision input chw low opt high dla_capable; do
  case "$name" in ''|'#'*) continue ;; esac
  if [ -n "$only" ] && [ "$name" != "$only" ]; then continue; fi
  built=$((built + 1))
  build_one "$name" "$onnx" "$engine" "$precision" "$input" "$chw" "$low" "$opt" "$high" "$dla_capable" ||
    failed+=("$name")
done <engines.tsv

if [ "$built" = 0 ]; then die "no engine named '$only' in engines.tsv (see --list)"; fi
if [ "${#failed[@]}" -gt 0 ]; then
  echo "build_engine.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "done; record with your latency figures: $here/device-record.txt"
