"""DeepStream: an nvinfer config for a full-frame classifier, its label file, and a gst-launch-1.0
pipeline for a video file, a V4L2 camera or a Jetson CSI camera.

    deepstream/config_infer_primary.txt   nvinfer [property] group (paths relative to this file,
                                          which is how nvinfer resolves them)
    deepstream/labels.txt                 classifier labels: ONE line, classes separated by ';'
    deepstream/model.<precision>.onnx     float RGB pixels 0..255 (N, 3, S, S) -> softmax (N, C)
    deepstream/model.<precision>.engine   built on the device by ../build_engine.sh
    deepstream/run_pipeline.sh            gst-launch-1.0 line: ./run_pipeline.sh video.mp4 | /dev/video0 | csi:0

nvinfer computes y = net-scale-factor * (x - offsets[c]) on 0..255 pixels; the graph holds the
run's normalisation (rise_edge.serving.graphs.fold_for_deepstream), so scale 1 and offsets 0 pass
the pixels through unchanged: exact, where a per-channel std cannot be one scalar scale.
"""

from __future__ import annotations

from collections.abc import Sequence

CONFIG_FILE = "config_infer_primary.txt"
LABELS_FILE = "labels.txt"
PIPELINE_FILE = "run_pipeline.sh"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}  # nvinfer's network-mode values
# nvinfer scaling-filter values (NvBufSurfTransform_Inter): the run's resize, as near as the GPU
# scaler has it (the resize is nvinfer's, so not bit-identical to PIL's; the normalisation is).
SCALING_FILTER = {"nearest": 0, "bilinear": 1, "bicubic": 2}
# The class whose probability is highest is attached when above this.
CLASSIFIER_THRESHOLD = 0.5


def nvinfer_properties(*, onnx_file: str, engine_file: str, precision: str, input_size: int,
                       interpolation: str, batch_size: int = 1, classifier_name: str = "rise-edge"
                       ) -> dict[str, str]:
    """The [property] keys of a primary (full-frame) classifier on the folded float-pixel graph."""
    return {
        "gpu-id": "0",
        "gie-unique-id": "1",
        "process-mode": "1",              # primary: whole frames
        "network-type": "1",              # classifier
        "onnx-file": onnx_file,
        "model-engine-file": engine_file,
        "labelfile-path": LABELS_FILE,
        "batch-size": str(batch_size),
        "network-mode": str(NETWORK_MODE[precision]),
        "infer-dims": f"3;{input_size};{input_size}",
        "network-input-order": "0",       # NCHW, as the graph takes it
        "model-color-format": "0",        # RGB, as the student was trained
        "net-scale-factor": "1",
        "offsets": "0;0;0",
        "maintain-aspect-ratio": "0",     # the run resizes to a square without padding
        "scaling-filter": str(SCALING_FILTER.get(interpolation, 1)),
        "classifier-threshold": str(CLASSIFIER_THRESHOLD),
        "classifier-type": classifier_name,
        "output-tensor-meta": "0",
    }


def nvinfer_config_text(properties: dict[str, str], note: Sequence[str] = ()) -> str:
    """A GKeyFile config with one [property] group (nvinfer's format), `note` as leading comments."""
    lines = [f"# {line}" for line in note]
    lines += ["[property]", *(f"{k}={v}" for k, v in properties.items())]
    return "\n".join(lines) + "\n"


def label_problem(name: str) -> str | None:
    """Why class `name` cannot be a label of nvinfer's classifier label file (None when it can):
    the file is one line per output layer, its classes separated by ';'."""
    if ";" in name:
        return ("holds ';', which separates the classes in DeepStream's classifier label file (it "
                "would read as two classes)")
    if name.splitlines() != [name]:
        return ("holds a line break, and DeepStream's classifier label file holds each output "
                "layer's classes on one line")
    return None


def labels_text(classes: Sequence[str]) -> str:
    """nvinfer's classifier label file: one line per output layer, its classes separated by ';'."""
    bad = [c for c in classes if label_problem(c)]
    if bad:  # package_run refuses such classes before writing anything; never write a wrong file
        raise ValueError(f"class name {bad[0]!r} {label_problem(bad[0])}")
    return ";".join(classes) + "\n"


PIPELINE_SCRIPT = r"""#!/usr/bin/env bash
# Run the classifier in a DeepStream pipeline (nvinfer) on a video file, a V4L2 camera or a Jetson
# CSI camera; the label of each frame is drawn by nvdsosd. Build the engine first: ../build_engine.sh
#
# usage: ./run_pipeline.sh SOURCE [--display]
#   SOURCE: a video file (any container uridecodebin reads), /dev/videoN (USB camera), csi:N
#   --display: show the frames (nveglglessink) instead of discarding them (fakesink)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_arg="${1:?usage: ./run_pipeline.sh SOURCE [--display] (a video file, /dev/videoN or csi:N)}"
sink="fakesink sync=false"
if [ "${2:-}" = "--display" ]; then
  sink="nveglglessink"
fi
engine="$here/__ENGINE__"
if [ ! -f "$engine" ]; then
  echo "run_pipeline.sh: $engine is missing; build it on this device first: $here/../build_engine.sh" >&2
  exit 2
fi

live=0
case "$source_arg" in
  csi:*)
    live=1
    src=(nvarguscamerasrc "sensor-id=${source_arg#csi:}" !
         "video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1")
    ;;
  /dev/video*)
    live=1
    src=(v4l2src "device=$source_arg" ! videoconvert ! nvvideoconvert !
         "video/x-raw(memory:NVMM),format=NV12")
    ;;
  *)
    [ -f "$source_arg" ] || { echo "run_pipeline.sh: no such video file: $source_arg" >&2; exit 2; }
    src=(uridecodebin "uri=file://$(realpath "$source_arg")")
    ;;
esac

# shellcheck disable=SC2086  # $sink is an element with its properties, split on purpose
exec gst-launch-1.0 -e "${src[@]}" ! m.sink_0 \
  nvstreammux name=m batch-size=1 width=1280 height=720 live-source="$live" \
  ! nvinfer "config-file-path=$here/__CONFIG__" \
  ! nvvideoconvert ! nvdsosd ! $sink
"""


def pipeline_script(config_file: str, engine_file: str) -> str:
    """run_pipeline.sh for this bundle's nvinfer config and engine."""
    return PIPELINE_SCRIPT.replace("__CONFIG__", config_file).replace("__ENGINE__", engine_file)
