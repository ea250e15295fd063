"""The train stage: the training loop, its methods and objectives, the teacher, the student, DDP.

    loop.py         `rise-edge train`: one run directory from a recipe (steps, evaluation, selection,
                    checkpoints)
    methods.py      the method registry (erm, kd, rise) and what each needs
    objectives.py   the ERM, KD and RISE objectives: (student logits, batch) -> named loss terms
    teacher.py      the CLIP teacher, its text embeddings and zero-shot logits (cached)
    student.py      the compact student: backbone + head, with the Preprocessing that travels with it
    distributed.py  torchrun / DDP set-up
"""
