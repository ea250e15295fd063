"""Serving bundles checked by the tools that load them: config.pbtxt through Triton's own
ModelConfig protobuf (tritonclient), the repository's ONNX models in ONNX Runtime against the run's
logits, the nvinfer config against DeepStream's documented keys and its preprocessing formula on a
test frame, build_engine.sh through bash -n, shellcheck and a fake trtexec for TensorRT 10 and 11,
the manifest's hashes; and a real tritonserver (pytriton's, Python backend) where one starts here."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_CLASSES
from rise_edge.cli import main
from rise_edge.config import ExportConfig
from rise_edge.export.driver import export_run
from rise_edge.files import file_sha256, write_json_atomic
from rise_edge.run_dir import EXPORT_DIR, EXPORT_JSON, open_run
from rise_edge.serving import package_run
from rise_edge.serving.deepstream import NETWORK_MODE

# The [property] keys of Gst-nvinfer's configuration file as DeepStream documents them (the
# "Gst-nvinfer File Configuration Specifications" table; gstnvinfer_property_parser.h).
DOCUMENTED_NVINFER_KEYS = {
    "gie-unique-id", "process-mode", "interval", "labelfile-path", "gpu-id",
    "secondary-reinfer-interval", "output-tensor-meta", "enable-dla", "use-dla-core", "batch-size",
    "tensor-meta-pool-size", "network-mode", "model-engine-file", "int8-calib-file",
    "workspace-size", "output-blob-names", "network-type", "force-implicit-batch-dim", "infer-dims",
    "output-io-formats", "layer-device-precision", "model-color-format", "net-scale-factor",
    "offsets", "mean-file", "maintain-aspect-ratio", "symmetric-padding", "scaling-filter",
    "scaling-compute-hw", "network-input-order", "input-tensor-from-meta", "custom-lib-path",
    "parse-bbox-func-name", "engine-create-func-name", "parse-classifier-func-name",
    "custom-network-config", "onnx-file", "tlt-encoded-model", "tlt-model-key",
    "num-detected-classes", "cluster-mode", "classifier-type", "classifier-threshold",
    "classifier-async-mode", "segmentation-threshold", "segmentation-output-order",
    "output-instance-mask", "input-object-min-width", "input-object-min-height",
    "input-object-max-width", "input-object-max-height", "operate-on-gie-id",
    "operate-on-class-ids", "filter-out-class-ids"}
TRITON_TYPES = {"TYPE_FP32": "tensor(float)", "TYPE_UINT8": "tensor(uint8)",
                "TYPE_FP16": "tensor(float16)", "TYPE_INT64": "tensor(int64)"}


def _pretend_qdq(run: Path) -> None:
    """Record an ok TensorRT Q/DQ graph. Making one needs nvidia-modelopt (the GPU extra); the
    bundle and build_engine.sh only copy, hash and hand it to trtexec, so the FP32 graph stands in."""
    export = run / EXPORT_DIR
    shutil.copyfile(export / "model.onnx", export / "model.int8-qdq-tensorrt.onnx")
    document = json.loads((export / EXPORT_JSON).read_text())
    fp32 = document["artefacts"]["onnx-fp32"]
    document["artefacts"]["onnx-int8-tensorrt"] = {
        **fp32, "precision": "int8", "path": "model.int8-qdq-tensorrt.onnx", "target": "tensorrt",
        "tool": "nvidia-modelopt (stood in for by the FP32 graph in this test)"}
    write_json_atomic(export / EXPORT_JSON, document)


@pytest.fixture(scope="module")
def exported_run(_tiny_run_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CPU export (FP32 + ONNX Runtime INT8) with a stand-in TensorRT Q/DQ record."""
    run = Path(shutil.copytree(_tiny_run_template, tmp_path_factory.mktemp("served") / "run"))
    # Speed does not count here (a 32-px model's INT8 may not beat FP32 on a busy CPU): the tests
    # below are about what a bundle serves, given export's recommendation.
    result = export_run(run, ExportConfig(formats=("onnx",), int8=True, calibration_size=24,
                                          int8_min_speedup=0.0), progress=False)
    assert not result.failed, result.table()
    _pretend_qdq(run)
    return run


@pytest.fixture(scope="module")
def bundle(exported_run: Path) -> Path:
    """The default Triton + DeepStream bundle of that run."""
    result = package_run(exported_run, ["triton", "deepstream"], progress=False)
    assert not result.missing
    return result.path


@pytest.fixture
def run_copy(exported_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported_run, tmp_path / "run", ignore=shutil.ignore_patterns(
        "bundle")))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _model_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _engines(bundle: Path) -> dict[str, list[str]]:
    lines = [line.split("\t") for line in (bundle / "engines.tsv").read_text().splitlines()
             if line and not line.startswith("#")]
    return {fields[0]: fields for fields in lines}


def _images(data_root: Path, run: Path, n: int = 6) -> np.ndarray:
    """(n, 3, 32, 32) tiny data set images normalised as the run's student expects, every domain
    and class among them."""
    from rise_edge.data.domains import load_rgb
    from rise_edge.data.transforms import eval_transform

    files = sorted(data_root.rglob("*.png"))
    transform = eval_transform(open_run(run).meta.preprocessing)
    return torch.stack([transform(load_rgb(p)) for p in files[:: len(files) // n][:n]]).numpy()


def test_triton_configs_parse_with_tritons_protobuf_and_declare_the_graphs_io(bundle: Path) -> None:
    from tritonclient.grpc import model_config_pb2

    engines = _engines(bundle)
    models = sorted(p.parent for p in (bundle / "triton").glob("*/config.pbtxt"))
    assert {m.name for m in models} == {"run_onnx_fp32", "run_onnx_int8", "run_trt_fp16",
                                        "run_trt_int8"}
    profile = _manifest(bundle)["export"]["export_config"]["batch_profile"]
    for folder in models:
        config = _model_config(folder / "config.pbtxt")
        assert config.name == folder.name
        if config.platform == "onnxruntime_onnx":
            graph = folder / "1" / "model.onnx"
        else:
            assert config.platform == "tensorrt_plan"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            graph = bundle / engines[f"triton-{folder.name}"][1]  # the plan is built from it
            assert engines[f"triton-{folder.name}"][2] == f"triton/{folder.name}/1/model.plan"
        assert config.max_batch_size == profile[2]
        assert all(profile[0] <= b <= profile[2] for b in config.dynamic_batching.preferred_batch_size)
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        for declared, real in [*zip(config.input, session.get_inputs(), strict=True),
                               *zip(config.output, session.get_outputs(), strict=True)]:
            assert declared.name == real.name
            assert TRITON_TYPES[model_config_pb2.DataType.Name(declared.data_type)] == real.type
            assert [-1, *declared.dims] == [d if isinstance(d, int) else -1 for d in real.shape]
        logits = next(o for o in config.output if o.name == "logits")
        assert (folder / logits.label_filename).read_text().splitlines() == list(TINY_CLASSES)


def test_onnxruntime_models_in_the_repository_give_the_runs_logits(
        bundle: Path, exported_run: Path, tiny_data_root: Path) -> None:
    run = open_run(exported_run)
    images = _images(tiny_data_root, exported_run)
    with torch.no_grad():
        reference = run.student(torch.from_numpy(images)).numpy()
    for name, tolerance in (("run_onnx_fp32", 1e-3), ("run_onnx_int8", None)):
        config = _model_config(bundle / "triton" / name / "config.pbtxt")
        session = ort.InferenceSession(str(bundle / "triton" / name / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        logits = session.run([config.output[0].name], {config.input[0].name: images})[0]
        assert logits.shape == (len(images), len(TINY_CLASSES))
        if tolerance is not None:
            assert np.abs(logits - reference).max() <= tolerance
        else:  # INT8: the file export judged, unchanged, and close to FP32
            assert file_sha256(bundle / "triton" / name / "1" / "model.onnx") == \
                file_sha256(exported_run / EXPORT_DIR / "model.int8-cpu.onnx")
            assert (logits.argmax(1) == reference.argmax(1)).mean() >= 5 / 6


def test_nvinfer_config_uses_documented_keys_and_reproduces_the_preprocessing(
        bundle: Path, exported_run: Path) -> None:
    from rise_edge.data.transforms import eval_transform

    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # keys are case-sensitive in GKeyFile
    parser.read(bundle / "deepstream" / "config_infer_primary.txt")
    props = dict(parser["property"])
    assert set(props) <= DOCUMENTED_NVINFER_KEYS, set(props) - DOCUMENTED_NVINFER_KEYS
    served = next(m for m in _manifest(bundle)["served"] if m["runtime"] == "deepstream")
    assert props["network-type"] == "1" and props["process-mode"] == "1"
    assert props["network-mode"] == str(NETWORK_MODE[served["precision"]]) == "1"  # INT8 Q/DQ
    labels = (bundle / "deepstream" / props["labelfile-path"]).read_text().splitlines()
    assert labels == [";".join(TINY_CLASSES)]  # a classifier's label file: one line per output
    graph = bundle / "deepstream" / props["onnx-file"]
    assert _engines(bundle)["deepstream"][2] == f"deepstream/{props['model-engine-file']}"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (pixels_input,), outputs = session.get_inputs(), session.get_outputs()
    assert [int(d) for d in props["infer-dims"].split(";")] == pixels_input.shape[1:]
    assert len(outputs) == 1  # nvinfer's classifier parser reads every output as a classifier

    # A test frame at network size: nvinfer's y = net-scale-factor * (x - offsets[c]), NCHW RGB.
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    scale = float(props["net-scale-factor"])
    offsets = np.array([float(v) for v in props["offsets"].split(";")], np.float32)
    tensor = (scale * (frame.astype(np.float32) - offsets)).transpose(2, 0, 1)[None]
    assert np.array_equal(tensor, frame.transpose(2, 0, 1)[None].astype(np.float32))
    probabilities = session.run(None, {pixels_input.name: np.ascontiguousarray(tensor)})[0]
    run = open_run(exported_run)
    normalised = eval_transform(run.meta.preprocessing)(Image.fromarray(frame))[None]
    with torch.no_grad():
        expected = torch.softmax(run.student(normalised), 1).numpy()
    assert np.abs(probabilities - expected).max() < 1e-5


def test_the_shell_scripts_pass_bash_n_and_shellcheck(bundle: Path) -> None:
    scripts = [bundle / "build_engine.sh", bundle / "deepstream" / "run_pipeline.sh"]
    for script in scripts:
        assert os.access(script, os.X_OK)
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package 'shellcheck'); bash -n passed")
    done = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


FAKE_TRTEXEC = r"""#!/usr/bin/env bash
# Records its arguments (one invocation a block) and writes the engine it is asked for.
printf '%s\n' "$@" '----' >>"$FAKE_TRTEXEC_LOG"
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_TRT_CODE] # trtexec $*"
for arg in "$@"; do
  case "$arg" in
    --saveEngine=*) echo engine >"${arg#--saveEngine=}" ;;
    --useDLACore=*) for _ in $(seq "${FAKE_FALLBACK:-0}"); do
        echo "[W] Default DLA is enabled but layer /head is not supported on DLA, falling back to GPU."
      done ;;
  esac
done
"""
FAKE_AUTOCAST = r"""#!/usr/bin/env bash
# python -m modelopt.onnx.autocast --onnx_path IN --output_path OUT ..., as the script calls it.
printf '%s\n' "$@" '----' >>"$FAKE_TRTEXEC_LOG.autocast"
[ "$2" = modelopt.onnx.autocast ] && cp "$4" "$6"
"""


def _build(bundle: Path, tmp_path: Path, code: str, *args: str, fallback: int = 0,
           damage: str | None = None) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a fresh copy of the bundle's build_engine.sh with a fake trtexec of version `code`
    (`damage`: a bundle file cut in half first)."""
    work = Path(shutil.copytree(bundle, tmp_path / f"bundle-{code}-{len(args)}-{damage is None}"))
    if damage is not None:
        data = (work / damage).read_bytes()
        (work / damage).write_bytes(data[:len(data) // 2])
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, text in (("trtexec", FAKE_TRTEXEC), ("fake-python", FAKE_AUTOCAST)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    log = tmp_path / f"trtexec-{code}-{len(args)}-{damage is None}.log"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_TRTEXEC_LOG": str(log),
           "FAKE_TRT_CODE": code, "FAKE_FALLBACK": str(fallback), "PYTHON": str(fake / "fake-python")}
    env.pop("TRT_VERSION", None)
    env.pop("TRTEXEC", None)
    done = subprocess.run(["bash", str(work / "build_engine.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = []
    if log.is_file():
        block: list[str] = []
        for line in log.read_text().splitlines():
            if line == "----":
                calls.append(block)
                block = []
            else:
                block.append(line)
    done.work = work  # type: ignore[attr-defined]
    return done, [c for c in calls if "--help" not in c]


def _call_for(calls: list[list[str]], engine: str) -> list[str]:
    return next(c for c in calls if any(a.endswith(f"{engine}.tmp") for a in c))


def test_build_engine_uses_tensorrt_10_flags(bundle: Path, tmp_path: Path) -> None:
    done, calls = _build(bundle, tmp_path, "100300")
    assert done.returncode == 0, done.stderr
    assert "TensorRT 10.3.0" in done.stdout
    fp16 = _call_for(calls, "run_trt_fp16/1/.model.plan")
    int8 = _call_for(calls, "run_trt_int8/1/.model.plan")
    stream = _call_for(calls, "deepstream/.model.int8.engine")
    assert "--fp16" in fp16 and "--onnx=engines/model.fp32.onnx" in fp16
    assert "--stronglyTyped" in int8 and "--int8" not in int8 and "--fp16" not in int8
    assert "--onnx=engines/model.int8-qdq.onnx" in int8
    assert "--stronglyTyped" in stream and "--onnx=deepstream/model.int8.onnx" in stream
    for call in calls:
        cache = [a for a in call if a.startswith("--timingCacheFile=cache/timing-")]
        assert cache and cache[0].endswith("-trt10.3.0.cache")
        assert not any(a.startswith("--useDLACore") for a in call)
    assert "--minShapes=images:1x3x32x32" in fp16 and "--optShapes=images:8x3x32x32" in fp16
    assert "--maxShapes=images:32x3x32x32" in fp16
    for plan in ("run_trt_fp16", "run_trt_int8"):  # where config.pbtxt's model expects it
        assert (done.work / "triton" / plan / "1" / "model.plan").is_file()
    assert (done.work / "deepstream" / "model.int8.engine").is_file()
    assert "tensorrt: 10.3.0" in (done.work / "device-record.txt").read_text()


def test_build_engine_uses_tensorrt_11s_strongly_typed_path(bundle: Path, tmp_path: Path) -> None:
    done, calls = _build(bundle, tmp_path, "110000")
    assert done.returncode == 0, done.stderr
    for call in calls:  # TensorRT 11 removed the precision flags; strong typing is always on
        assert not {"--fp16", "--int8", "--stronglyTyped", "--best"} & set(call)
    fp16 = _call_for(calls, "run_trt_fp16/1/.model.plan")
    assert "--onnx=cache/model.fp32.fp16-autocast.onnx" in fp16  # an FP16 graph from AutoCast
    assert "--onnx=engines/model.int8-qdq.onnx" in _call_for(calls, "run_trt_int8/1/.model.plan")
    autocast = (tmp_path / "trtexec-110000-0-True.log.autocast").read_text().split("----")
    assert all({"--low_precision_type", "fp16", "--keep_io_types"} <= set(c.split()) for c in
               autocast if c.strip())  # FP32 I/O, as config.pbtxt declares


def test_build_engine_refuses_graphs_that_differ_from_the_manifest(bundle: Path, tmp_path: Path
                                                                   ) -> None:
    done, calls = _build(bundle, tmp_path, "100300", damage="engines/model.fp32.onnx")
    assert done.returncode == 2 and "graphs differ from SHA256SUMS" in done.stderr and not calls


def test_build_engine_reports_dla_gpu_fallback_and_refuses_dla_where_tensorrt_has_none(
        bundle: Path, tmp_path: Path) -> None:
    done, calls = _build(bundle, tmp_path, "100300", "--dla", "0", "--allow-gpu-fallback",
                         fallback=2)
    assert done.returncode == 0, done.stderr
    stream = _call_for(calls, "deepstream/.model.int8.engine")
    assert {"--useDLACore=0", "--allowGPUFallback", "--int8", "--fp16"} <= set(stream)
    assert "--minShapes=pixels:1x3x32x32" in stream and "--maxShapes=pixels:1x3x32x32" in stream
    assert "2 layer(s) fell back to the GPU" in done.stdout
    assert "gpu_fallback_layers: 2" in (done.work / "logs" / "deepstream.build.txt").read_text()
    assert not any("--useDLACore=0" in c for c in calls if c is not stream)  # Triton's: GPU

    done, calls = _build(bundle, tmp_path, "100800", "--dla", "0")
    assert done.returncode == 2 and "has no DLA" in done.stderr and not calls


def test_manifest_hashes_every_file_and_says_what_to_record(bundle: Path, exported_run: Path
                                                            ) -> None:
    manifest = _manifest(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "SHA256SUMS"}
    for rel, entry in manifest["files"].items():
        assert file_sha256(bundle / rel) == entry["sha256"]
        assert (bundle / rel).stat().st_size == entry["bytes"]
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle, check=True)
    assert manifest["kind"] == "rise-edge serving bundle"
    assert manifest["run"]["classes"] == list(TINY_CLASSES)
    assert manifest["run"]["student_sha256"] == file_sha256(exported_run / "student.safetensors")
    assert manifest["preprocessing"]["input_size"] == 32
    assert {"onnx", "onnxruntime", "torch"} <= set(manifest["export"]["versions"])
    assert "met" in manifest["int8"]["onnx-int8"]
    assert manifest["int8"]["recommended_cpu_int8"] == "onnx-int8"
    record = " ".join(manifest["on_device"]["record"])
    assert "nvpmodel" in record and "jetson_clocks" in record and "TensorRT" in record


def test_embedding_is_served_beside_the_logits(run_copy: Path, tiny_data_root: Path) -> None:
    result = package_run(run_copy, ["triton"], serve=["onnx-fp32"], embedding=True,
                         progress=False)
    config = _model_config(result.path / "triton" / "run_onnx_fp32" / "config.pbtxt")
    assert [o.name for o in config.output] == ["logits", "embedding"]
    session = ort.InferenceSession(str(result.path / "triton/run_onnx_fp32/1/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    images = _images(tiny_data_root, run_copy)
    logits, embedding = session.run(["logits", "embedding"], {"images": images})
    student = open_run(run_copy).student
    with torch.no_grad():  # the classifier's input: z on a rise head, the backbone feature h else
        h = student.backbone(torch.from_numpy(images))
        z = student.projector(h) if student.head_spec.kind == "rise" else h
        expected = student(torch.from_numpy(images))
    assert list(config.output[1].dims) == [z.shape[1]]
    assert np.abs(embedding - z.numpy()).max() < 1e-4
    assert np.abs(logits - expected.numpy()).max() < 1e-3


def _cli(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def test_bad_requests_get_one_line_and_the_readme_exit_codes(run_copy: Path, tmp_path: Path
                                                             ) -> None:
    run = str(run_copy)
    result = _cli(run, "--format", "tritn")
    assert result.exit_code == 2 and "did you mean 'triton'" in result.output
    result = _cli(run, "--format", "triton", "--serve", "onnx-int8-qat-cpu")
    assert result.exit_code == 2 and "never made" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = _cli(run, "--format", "deepstream", "--serve", "onnx-fp32")
    assert result.exit_code == 2 and "TensorRT" in result.output
    result = _cli(run, "--format", "triton", "--int8")  # packaging makes no artefact
    assert result.exit_code == 2 and "only packages what export made" in result.output
    result = _cli(run, "--serve", "onnx-fp32")  # checked before anything is exported
    assert result.exit_code == 2 and "go with --format triton" in result.output
    assert "artefact" not in result.output

    export_json = run_copy / EXPORT_DIR / EXPORT_JSON
    document = json.loads(export_json.read_text())
    document["artefacts"]["onnx-int8"].update(status="failed", reason="a test said so")
    document["artefacts"]["onnx-int8-tensorrt"].update(status="unavailable",
                                                       reason="nvidia-modelopt is not installed")
    write_json_atomic(export_json, document)
    result = _cli(run, "--format", "triton", "--serve", "onnx-int8")
    assert result.exit_code == 2 and "'failed'" in result.output and "a test said so" in result.output
    assert not (run_copy / "bundle").exists()
    # What the exporting machine could not make: the rest is bundled, exit status 3.
    result = _cli(run, "--format", "triton", "--serve", "onnx-fp32", "--serve", "tensorrt-int8")
    assert result.exit_code == 3, result.output
    assert "nvidia-modelopt is not installed" in result.output
    manifest = _manifest(run_copy / "bundle")
    assert [m["artefact"] for m in manifest["served"]] == ["onnx-fp32"]
    assert "tensorrt-int8" in manifest["left_out"]


def test_a_bundle_folder_is_replaced_whole_and_only_when_it_is_ours(run_copy: Path,
                                                                    tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    result = _cli(str(run_copy), "--format", "triton", "--bundle-dir", str(theirs))
    assert result.exit_code == 2 and "does not say rise-edge made it" in result.output
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]

    ours = tmp_path / "ours"
    assert _cli(str(run_copy), "--format", "triton", "--bundle-dir", str(ours)).exit_code == 0
    (ours / "stray.txt").write_text("left by hand")
    result = _cli(str(run_copy), "--format", "deepstream", "--bundle-dir", str(ours))
    assert result.exit_code == 0, result.output
    assert not (ours / "stray.txt").exists() and not (ours / "triton").exists()
    assert (ours / "deepstream" / "config_infer_primary.txt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".work-")]


# ---------------------------------------------------------------------------------------------------
# A real Triton server: pytriton's tritonserver, Python backend only, on 127.0.0.1.

PYTHON_MODEL = '''
import sys
sys.path[:0] = {paths!r}  # the stub's own interpreter: numpy < 2 first, then onnxruntime
import json
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """The bundle's ONNX model run through ONNX Runtime inside Triton's Python backend."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        here = args["model_repository"] + "/" + args["model_version"]
        self.session = ort.InferenceSession(here + "/model.onnx", providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {{n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}}
            values = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)]))
        return responses
'''


def _tritonserver() -> tuple[Path, Path] | str:
    """(tritonserver, pytriton's folder) or why there is none here."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # located, never imported: it pins numpy < 2
    if spec is None or not spec.submodule_search_locations:
        return "nvidia-pytriton (which bundles tritonserver) is not installed"
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    return (binary, root) if binary.is_file() else f"{binary} is missing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_triton_server_serves_the_bundles_model(bundle: Path, exported_run: Path,
                                                       tmp_path: Path, tiny_data_root: Path) -> None:
    found = _tritonserver()
    if isinstance(found, str):
        pytest.skip(f"no Triton server here: {found}")
    binary, root = found
    stub_numpy = os.environ.get("RISE_EDGE_TRITON_STUB_PATH", "")
    if not (Path(stub_numpy) / "numpy").is_dir():
        pytest.skip("pytriton's Python-backend stub reads zeros through numpy 2; give a folder "
                    "holding numpy<2 in RISE_EDGE_TRITON_STUB_PATH (.ci/run makes one)")
    import tritonclient.grpc as grpcclient

    # The bundle's model, in its layout, served by the Python backend (the only one pytriton has).
    repo = tmp_path / "repository"
    model = Path(shutil.copytree(bundle / "triton" / "run_onnx_fp32", repo / "run_onnx_fp32"))
    config = (model / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config
    (model / "config.pbtxt").write_text(config.replace('platform: "onnxruntime_onnx"',
                                                       'backend: "python"'))
    site = str(Path(ort.__file__).parent.parent)
    (model / "1" / "model.py").write_text(PYTHON_MODEL.format(paths=[stub_numpy, site]))
    backends = tmp_path / "backends" / "python"
    backends.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backends / name).symlink_to(root / "backends" / "python" / name)
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(stub / "triton_python_backend_stub", backends)
    port = _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(root.parent.parent / "nvidia_pytriton.libs")}
    log = (tmp_path / "tritonserver.log").open("w")
    server = subprocess.Popen(
        [str(binary), f"--model-repository={repo}", f"--backend-directory={backends.parent}",
         "--grpc-address=127.0.0.1", f"--grpc-port={port}", "--allow-http=false",
         "--allow-metrics=false", "--disable-auto-complete-config", "--exit-timeout-secs=5"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        for _ in range(120):  # up to 60 s for the server and the model to come up
            if server.poll() is not None:
                break
            try:
                if client.is_model_ready("run_onnx_fp32"):
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        if server.poll() is not None or not client.is_model_ready("run_onnx_fp32"):
            text = (tmp_path / "tritonserver.log").read_text()
            # The server rejecting the bundle's model is a failure; not starting at all is not.
            assert "failed to load 'run_onnx_fp32'" not in text, text[-2000:]
            pytest.skip("tritonserver did not start here: " + text[-400:].replace("\n", " "))
        served = client.get_model_metadata("run_onnx_fp32")
        assert [i.name for i in served.inputs] == ["images"] and served.outputs[0].name == "logits"
        images = _images(tiny_data_root, exported_run, 5)
        with torch.no_grad():
            reference = open_run(exported_run).student(torch.from_numpy(images)).numpy()
        for batch in (images[:1], images):  # bounded: two requests
            request = grpcclient.InferInput("images", list(batch.shape), "FP32")
            request.set_data_from_numpy(np.ascontiguousarray(batch))
            answer = client.infer("run_onnx_fp32", [request],
                                  outputs=[grpcclient.InferRequestedOutput("logits")])
            logits = answer.as_numpy("logits")
            assert np.abs(logits - reference[:len(batch)]).max() <= 1e-3
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
