"""TensorBoard: scalars per step, the recipe as text and hyper-parameters, reports as text."""

from __future__ import annotations

from pathlib import Path

from rise_edge.track.text import code


class TensorBoardTracker:
    """Event files in `folder` (<run>/tensorboard/). `purge_step` (a resumed run: the checkpoint's
    step + 1) makes TensorBoard's readers hide what an interrupted attempt logged from that step on,
    as metrics.jsonl drops those lines; `text_step` is the step text summaries are shown at."""

    name = "TensorBoard"

    def __init__(self, folder: Path, purge_step: int | None = None, text_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)
        self.text_step = text_step

    def log_params(self, params: dict[str, str], recipe_text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("recipe", code(recipe_text), self.text_step)
        # The HParams dashboard's record of this run (add_hparams would make a sub-run folder).
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # seen live, and a failing folder is found at the step it fails

    def log_file(self, path: Path, folder: str, text: str) -> None:
        if not text:  # a plot: TensorBoard shows text here, the file stays in the run directory
            return
        self.writer.add_text(f"{folder}/{path.name}", text, self.text_step)
        self.writer.flush()

    def close(self, status: str | None) -> None:
        self.writer.close()

