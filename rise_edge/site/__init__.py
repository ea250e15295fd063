"""A trained run meets a site: unlabelled images from where the model is deployed.

    (rise_edge.data.site_images: the site folder, listed in any layout, never read as labels)
    estimates.py  label-free accuracy estimates from logits (ATC, DoC, teacher agreement), shift flag
    assess.py     one model's logits on the site and on source validation, and its site record
    adapt.py      adaptation without labels: AdaBN, T3A
    inference.py  the student over many images: ONNX Runtime when it exports, else PyTorch
    child.py      `rise-edge adapt`: the adapted child run beside its never-changed parent
"""
