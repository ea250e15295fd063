"""The export stage: a trained run directory -> deployable artefacts recorded in export/export.json.

    driver.py      `rise-edge export`: plan, make each artefact under a temporary name, record it
    session.py     what every artefact maker is handed: the run, the config, the data (loaded once),
                   the ONNX graph export, metadata and the parity check
    graph_form.py  the forms a graph takes before quantization (static pads, folded BN, constants)
    calibration.py the calibration set, fidelity and parity images (source domains only)
    fidelity.py    the INT8 judge: accuracy and agreement of a candidate against FP32
    fake_quant.py  fake-quantized modules for quantization-aware training
    qat.py         quantization-aware fine-tuning, through the training loop's own machinery

The makers themselves live with their backends (rise_edge.backends); this stage never imports them,
it finds them in rise_edge.backend_table.
"""
