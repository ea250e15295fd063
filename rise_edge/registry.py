"""The names rise-edge knows beyond its code: data sets and built teachers, with what each needs.
Plugins (rise_edge.plugins) add to them. Nothing heavy is imported here, so the command line can
load plugins at start-up without loading torch; rise_edge.data.domains and rise_edge.train.teacher re-export these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class KnownDataset:
    """What the registry knows of a published domain-generalisation data set."""

    folder: str                      # DomainBed folder name under the root
    domains: tuple[str, ...]
    classes: tuple[str, ...] | None  # None: discovered from the folders (DomainNet's 345)
    anchors: tuple[str, ...] | None = None  # RD anchors when domains are not styles
    # Generates the data set (root: data.root, or None for the cache) and returns its folder.
    build: Callable[[Path | None], Path] | None = field(default=None, compare=False)
    # The folder under the root where `rise-edge data download` places its official split lists
    # (rise_edge.data.download), for messages that say how to fetch them; None: it has none.
    official_lists: str | None = None


_OFFICE_HOME_CLASSES = tuple("""Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar
Candles Chair Clipboards Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops
Flowers Folder Fork Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker Monitor Mop Mouse
Mug Notebook Oven Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin Radio Refrigerator Ruler Scissors
Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table Telephone ToothBrush Toys Trash_Can
Webcam""".split())

_PHOTO_QUALITY_ANCHORS = ("bright photo", "corrupted photo", "dark photo", "good photo")

KNOWN_DATASETS: dict[str, KnownDataset] = {
    "PACS": KnownDataset(
        "PACS", ("art_painting", "cartoon", "photo", "sketch"),
        ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person"),
        official_lists="PACS-splits"),
    "VLCS": KnownDataset(
        "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
        ("bird", "car", "chair", "dog", "person"), anchors=_PHOTO_QUALITY_ANCHORS),
    "OfficeHome": KnownDataset(
        "office_home", ("Art", "Clipart", "Product", "Real World"), _OFFICE_HOME_CLASSES),
    "TerraIncognita": KnownDataset(
        "terra_incognita", ("location_100", "location_38", "location_43", "location_46"),
        ("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"),
        anchors=_PHOTO_QUALITY_ANCHORS),
    "DomainNet": KnownDataset(
        "domain_net", ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"), None),
}


def register_dataset(name: str, spec: KnownDataset) -> KnownDataset:
    """Make a data set known by name (recipes' data.dataset): its folder, domains, classes, RD anchors,
    and for generated data sets the function that builds them. Plugins call this (rise_edge.plugins)."""
    if name in KNOWN_DATASETS and KNOWN_DATASETS[name] != spec:
        raise ValueError(f"data set '{name}' is already registered")
    KNOWN_DATASETS[name] = spec
    return spec


def known_dataset(name: str) -> KnownDataset | None:
    """The registered data set called `name` (or whose folder is `name`), plugins' included."""
    from rise_edge.plugins import load_plugins

    load_plugins()
    for key, spec in KNOWN_DATASETS.items():
        if name in (key, spec.folder):
            return spec
    return None


# Teachers that are built rather than downloaded (the demo's, a plugin's); name -> function returning
# an open_clip 'local-dir:' folder (open_clip_config.json + weights), built on first use.
BUILT_TEACHERS: dict[str, Callable[[], Path]] = {}


def register_teacher(name: str, build: Callable[[], Path]) -> None:
    """Make teacher.model=`name` load the open_clip 'local-dir:' folder `build()` returns (built on
    first use). Plugins call this (rise_edge.plugins)."""
    old = BUILT_TEACHERS.get(name)
    if old is not None and getattr(old, "__qualname__", old) != getattr(build, "__qualname__", build):
        raise ValueError(f"teacher '{name}' is already registered")
    BUILT_TEACHERS[name] = build


def built_teacher(name: str) -> Callable[[], Path] | None:
    """The registered builder of teacher `name` (plugins' included), or None."""
    from rise_edge.plugins import load_plugins

    load_plugins()
    return BUILT_TEACHERS.get(name)
