"""A trained run meets a site: unlabelled images from where the model is deployed.

    (rise_edge.data.site_images: the site folder, listed in any layout, never read as labels)
    estimates.py  label-free accuracy estimates from logits (ATC, ATC after temperature scaling, DoC,
                  teacher agreement), ordered by their measured errors; shift flag
    assess.py     one model's logits on the site and on source validation, and its site record
    adapt.py      adaptation without labels or teacher: AdaBN, T3A
    distill.py    adaptation with the run's teacher: the student distilled on the site's images,
                  the sources replayed, the step chosen by agreement with the teacher
    inference.py  the student over many images: ONNX Runtime when it exports, else PyTorch
    child.py      `rise-edge adapt`: the adapted child run beside its never-changed parent
"""
