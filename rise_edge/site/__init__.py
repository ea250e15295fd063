"""A trained run meets a site: unlabelled images from where the model is deployed.

    images.py     the site folder: listed (any layout, never read as labels), checked, hashed
    estimates.py  label-free accuracy estimates from logits (ATC, DoC, teacher agreement), shift flag
    assess.py     one model's logits on the site and on source validation, and its site record
    adapt.py      adaptation without labels: AdaBN, T3A
    child.py      `rise-edge adapt`: the adapted child run beside its never-changed parent
"""
