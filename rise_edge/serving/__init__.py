"""Serving bundles: what export made and judged, laid out for the tools that load it.

    rise-edge export RUN --format triton       Triton model repository (ONNX Runtime and TensorRT)
    rise-edge export RUN --format deepstream   DeepStream nvinfer classifier config and pipeline

Both come with build_engine.sh (TensorRT engines built on the device, for its TensorRT version) and
a manifest with every file's sha256 (rise_edge.serving.bundle).

A stage after export rather than backends in its registry: a backend makes one artefact from the
student (an ExportSession) and has a runner that bench times; a bundle makes no artefact and runs
nothing: it arranges files export already made and judged, with their hashes, for other programs.
It needs neither the data set nor a new export, and it reads export.json the way bench does.
"""

from __future__ import annotations

from collections.abc import Sequence

from rise_edge.errors import UserError, did_you_mean
from rise_edge.serving.bundle import BUNDLE_DIR, SERVING_FORMATS, BundleResult, package_run

__all__ = ["BUNDLE_DIR", "SERVING_FORMATS", "BundleResult", "package_run", "split_formats"]


def split_formats(formats: Sequence[str], export_formats: Sequence[str]
                  ) -> tuple[list[str], list[str]]:
    """`export --format` words as (artefact formats, bundle formats), each checked (with a
    suggestion) against both lists."""
    known = [*export_formats, "all", *SERVING_FORMATS]
    for word in formats:
        if word not in known:
            raise UserError(f"unknown export format '{word}'{did_you_mean(word, known)}; formats: "
                            f"{', '.join(known)}")
    return ([f for f in formats if f not in SERVING_FORMATS],
            [f for f in SERVING_FORMATS if f in formats])
