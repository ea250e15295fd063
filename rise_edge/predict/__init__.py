"""`rise-edge predict`: classify images, folders, lists and videos with one artefact of a run.

    from rise_edge.predict import predict_run

    for p in predict_run("runs/pacs", ["photos/", "clip.mp4"], artefact="onnx-int8", top_k=3):
        print(p.source, p.classes, p.probabilities)

sources.py expands SOURCE arguments into a lazy stream of items, engine.py chooses and verifies the
artefact as bench does, stream.py runs the loop, writers.py writes terminal lines, CSV or JSON
Lines. docs/predict.md says what each does.
"""

from rise_edge.predict.stream import Prediction, Predictions, predict_run

__all__ = ["Prediction", "Predictions", "predict_run"]
