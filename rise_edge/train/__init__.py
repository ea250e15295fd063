"""The train stage: the training loop, its methods and objectives, the teacher, the student, DDP.

    loop.py         `rise-edge train`: one run directory from a recipe (steps, evaluation, selection,
                    checkpoints)
    methods.py      the method registry (erm, kd, rise) and what each needs
    objectives.py   the ERM, KD and RISE objectives: (student logits, batch) -> named loss terms
    teacher.py      the CLIP teacher, its text embeddings and zero-shot logits (cached)
    teacher_cache.py  the teacher-view cache: the teacher's embedding of every training view, once
    cache_build.py  build or inspect the caches a sweep's runs or a recipe read
    student.py      the compact student: backbone + head, with the Preprocessing that travels with it
    distributed.py  torchrun / DDP set-up
"""
