"""Time one training step of ERM and of RISE with the same student and batch, on this machine.

The RISE step is split into its parts, each timed on its own in the same process: the teacher's
forward pass, the loss terms (forward and backward of CE + KD + AD + RD on the step's tensors), and
the rest (student forward/backward and the optimizer). Weights are random: time does not depend on
their values, and no CLIP weights can be downloaded here. The architectures are the real ones.

    python benchmarks/train_step.py --student resnet18 --teacher ViT-B-16 --batch 32 --size 224

The RISE student has the default head (split: the classifier on the backbone features, a projector
beside it for the language terms); --head rise times the released head.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from rise_edge.bench.resources import machine_info
from rise_edge.config import CLIP_TEMPLATES, LossConfig, StudentConfig, TeacherConfig
from rise_edge.train.objectives import (ErmObjective, RiseObjective, absolute_distance, kd_loss,
                                        relative_distance)
from rise_edge.train.student import build_student
from rise_edge.train.teacher import load_teacher


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--head", choices=("split", "rise"), default="split",
                        help="the RISE student's head (split: the default; rise: the released one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")

    teacher = load_teacher(TeacherConfig(model=args.teacher, pretrained="none"), device)
    classes = [f"class {i}" for i in range(args.classes)]
    text = teacher.text_embeddings(classes, CLIP_TEMPLATES, ["art painting", "cartoon", "photo"])
    student_cfg = StudentConfig(model=args.student, pretrained="none", image_size=args.size)
    erm_student, pre = build_student(student_cfg, "linear", args.classes, None)
    rise_student, _ = build_student(student_cfg, args.head, args.classes, text.prototypes.shape[1])
    if args.head == "rise":
        rise_student.init_classifier_from_text(text.prototypes)
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.batch,))
    loss_cfg = LossConfig(w_ce=0.2, w_kd=0.8, w_dist=1.0)
    erm, rise = ErmObjective(), RiseObjective(loss_cfg, teacher, text, pre)

    def step(student, objective):
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)

        def run():
            student.train()
            terms = objective(student, images, labels)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
        return run

    with torch.no_grad():
        z0, logits0 = rise_student(images, with_embedding=True)
        q = teacher.zero_shot_logits(images, pre, text.prototypes)

    def loss_terms():
        z = z0.detach().requires_grad_(True)
        logits = logits0.detach().requires_grad_(True)
        total = (0.2 * torch.nn.functional.cross_entropy(logits, labels)
                 + 0.8 * kd_loss(logits, q, loss_cfg.tau)
                 + absolute_distance(z, text.prototypes, labels)
                 + relative_distance(z, text.raw_prototypes, text.anchors, labels))
        total.backward()

    timings = {
        "erm_step_s": _median_time(step(erm_student, erm), args.repeats),
        "rise_step_s": _median_time(step(rise_student, rise), args.repeats),
        "teacher_forward_s": _median_time(
            lambda: teacher.zero_shot_logits(images, pre, text.prototypes), args.repeats),
        "loss_terms_s": _median_time(loss_terms, args.repeats * 20),
    }
    timings["loss_share_of_rise_step"] = timings["loss_terms_s"] / timings["rise_step_s"]
    timings["teacher_share_of_rise_step"] = timings["teacher_forward_s"] / timings["rise_step_s"]
    timings["rise_over_erm"] = timings["rise_step_s"] / timings["erm_step_s"]
    machine = {"cpu": machine_info()["cpu"], "cores": torch.get_num_threads(),
               "python": platform.python_version(), "torch": torch.__version__}
    record = {"args": vars(args) | {"out": str(args.out.name)}, "timings": timings, "machine": machine}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# One training step on the CPU: ERM vs RISE",
        "",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`",
        f"Machine: {machine['cpu']}, {machine['cores']} threads; Python {machine['python']}, "
        f"torch {machine['torch']}. Median of {args.repeats} steps after one warm-up "
        f"(loss terms: median of {args.repeats * 20}).",
        f"Student {args.student} at {args.size} px (random init), batch {args.batch}, "
        f"{args.classes} classes, RISE on the '{args.head}' head; teacher {args.teacher} (random "
        "weights, real architecture), fp32.",
        "",
        "| part | seconds | share of the RISE step |",
        "|---|---|---|",
        f"| ERM step (student fwd + bwd + SGD) | {timings['erm_step_s']:.3f} | |",
        f"| RISE step (all of it) | {timings['rise_step_s']:.3f} | 100 % |",
        f"| teacher forward ({args.teacher}, no grad) | {timings['teacher_forward_s']:.3f} | "
        f"{100 * timings['teacher_share_of_rise_step']:.1f} % |",
        f"| loss terms CE+KD+AD+RD (fwd + bwd) | {timings['loss_terms_s']:.5f} | "
        f"{100 * timings['loss_share_of_rise_step']:.3f} % |",
        "",
        f"RISE step / ERM step = {timings['rise_over_erm']:.2f}x: the difference is the teacher's "
        "forward pass (and the projector); the loss terms themselves are "
        f"{100 * timings['loss_share_of_rise_step']:.3f} % of the step (target: under 5 %).",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
