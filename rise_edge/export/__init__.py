"""The export stage: a trained run directory -> deployable artefacts recorded in export/export.json.

    driver.py      `rise-edge export`: plan, make each artefact under a temporary name, record it
    session.py     what every artefact maker is handed: the run, the config, the data (loaded once),
                   the ONNX graph export, metadata and the parity check
    graph_form.py  the student's form before export: static pads, folded BatchNorm
    onnx_graph.py  reading and folding the exported graph: node -> module, tensors along the graph,
                   the same-shapes check, constant folding
    calibration.py the calibration set, fidelity and parity images (source domains only)
    fidelity.py    the INT8 judge: accuracy and agreement of a candidate against FP32
    fake_quant.py  fake-quantized modules for quantization-aware training
    qat.py         quantization-aware fine-tuning, through the training loop's own machinery

The makers themselves live with their backends (rise_edge.backends); this stage never imports them,
it finds them in rise_edge.backend_table.
"""
