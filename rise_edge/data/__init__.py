"""The data stage: domain-folder data sets, their leave-one-domain-out splits, transforms, download.

    domains.py     DomainSplits, build_splits, DomainImages, EpochBatches (the splits training uses)
    transforms.py  the student's eval and train transforms, from its Preprocessing
    views.py       training views: RISE's augmentation as parameters seeded by (image bytes, k)
    download.py    `rise-edge download`: fetch and verify a known data set
    site_images.py a deployment site's unlabelled images: listed in any layout, checked, hashed

Plugins register data sets here, as before the layout (the registry itself has no torch in it, so
`import rise_edge.data` stays light for the command line's start-up).
"""

from rise_edge.registry import KNOWN_DATASETS, KnownDataset, known_dataset, register_dataset

__all__ = ["KNOWN_DATASETS", "KnownDataset", "known_dataset", "register_dataset"]
