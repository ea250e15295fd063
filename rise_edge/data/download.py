"""`rise-edge data download`: fetch a published domain-generalisation data set into the data root.

Sources are DomainBed's (its scripts/download.py), arranged into the layout rise-edge reads,
`<root>/<folder>/<domain>/<class>/<image>`. Downloads resume after an interruption (HTTP Range),
archives are checked against a sha256 (the publisher's where one is published, else the one recorded
at the first download, so a changed or damaged archive is noticed on every later use), extraction
refuses members that would land outside their folder, and the data set appears under its final name
only once it is complete: an interrupted run leaves nothing a recipe could mistake for data.

PACS's official train/crossval split lists are not in DomainBed's archive: they are fetched from a
copy pinned at one commit of a public repository, each file checked against the sha256 of its bytes
at that commit, and placed as `<root>/PACS-splits/` (where the PACS recipes' data.split_lists
looks) only once all of them are there; `--split-lists PATH` takes a folder of lists the user has,
checked line by line for their format instead. The data set and its lists are two results: lists
that cannot be had now (a mirror without them, no network) are a warning with the command that
fetches them later, and the data set is placed and usable all the same.

Work files live in `<root>/.rise-edge-downloads/`: `NAME.part` (a partial download), `NAME`
(a finished archive, removed after extraction unless kept), `checksums.json`, and staging folders
that a killed extraction leaves behind and the next run removes.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qs, urlparse
from urllib.request import Request, urlopen


from rise_edge.logs import logger
from rise_edge.logs import progress as progress_bar
from rise_edge.data.domains import IMAGE_SUFFIXES, KNOWN_DATASETS, KnownDataset
from rise_edge.errors import UserError
from rise_edge.files import file_sha256, run_lock, write_json_atomic

WORK_FOLDER = ".rise-edge-downloads"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """One file to fetch. sha256 is the publisher's checksum (or that of the bytes at a pinned
    commit, `sha256_origin` says which); None where none is known."""

    url: str
    filename: str
    sha256: str | None = None
    sha256_origin: str = "the published checksum"


@dataclass(frozen=True)
class SplitLists:
    """Official split lists that a data set's recipes read (data.split_lists), fetched into
    `<root>/<folder>/`: `<domain>_<split>_kfold.txt` for every domain and split, from `base_url`
    (a folder at a fixed commit: its files never change), each checked against its sha256."""

    folder: str
    base_url: str
    sha256: tuple[tuple[str, str], ...]  # (file name, sha256 of its bytes at that commit)
    origin: str  # where a person finds them

    def archives(self) -> tuple[Archive, ...]:
        return tuple(Archive(f"{self.base_url}/{name}", name, digest,
                             "the sha256 of that file at the pinned commit")
                     for name, digest in self.sha256)


@dataclass(frozen=True)
class DataSource:
    """Where a known data set comes from and how its extracted archives become the layout.

    arrange(staging, dataset_dir) moves what the archives unpacked in `staging` into `dataset_dir`.
    """

    archives: tuple[Archive, ...]
    arrange: Callable[[Path, Path], None]
    origin: str  # the data set's home page, for the licence and for manual downloads
    after: str = ""  # what the user still has to do, printed after a successful download
    split_lists: SplitLists | None = None


def _rename_single(folder_name: str) -> Callable[[Path, Path], None]:
    """The archive unpacks into one folder under another name (PACS: kfold/)."""

    def arrange(staging: Path, dataset_dir: Path) -> None:
        source = staging / folder_name
        if not source.is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir())) or "(nothing)"
            raise UserError(f"the archive does not hold the folder '{folder_name}' (it holds: "
                            f"{found}); it is not the expected archive")
        source.rename(dataset_dir)

    return arrange


def _merge_domains(staging: Path, dataset_dir: Path) -> None:
    """Each archive unpacks one domain folder (DomainNet): gather them."""
    dataset_dir.mkdir()
    for folder in sorted(p for p in staging.iterdir() if p.is_dir() and p != dataset_dir):
        folder.rename(dataset_dir / folder.name)


_TERRA_LOCATIONS = ("100", "38", "43", "46")


def _arrange_terra_incognita(staging: Path, dataset_dir: Path) -> None:
    """Camera-trap images sorted by DomainBed's four locations and ten categories (images with
    several annotations go to each of their categories, as in DomainBed)."""
    images = staging / "eccv_18_all_images_sm"
    annotations = staging / "caltech_images_20210113.json"
    if not images.is_dir() or not annotations.is_file():
        raise UserError("the TerraIncognita archives do not hold eccv_18_all_images_sm/ and "
                        "caltech_images_20210113.json; they are not the expected archives")
    record = json.loads(annotations.read_text())
    wanted = set(KNOWN_DATASETS["TerraIncognita"].classes or ())
    category = {c["id"]: c["name"] for c in record["categories"]}
    labels: dict[str, set[str]] = {}
    for annotation in record["annotations"]:
        name = category.get(annotation["category_id"])
        if name in wanted:
            labels.setdefault(annotation["image_id"], set()).add(name)
    dataset_dir.mkdir()
    for image in record["images"]:
        location = str(image["location"])
        if location not in _TERRA_LOCATIONS:
            continue
        for name in sorted(labels.get(image["id"], ())):
            target = dataset_dir / f"location_{location}" / name / Path(image["file_name"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(images / image["file_name"], target)


_DOMAINNET = "http://csr.bu.edu/ftp/visda/2019/multi-source"

# PACS's official lists as the RSC code (Huang et al., ECCV 2020) publishes them, paths relative to
# the PACS folder ("art_painting/dog/pic_333.jpg 1", 1-based labels in alphabetical class order):
# the same lines, with "PACS/" in front, as the lists the RISE code reads.
_PACS_LISTS = SplitLists(
    "PACS-splits",  # KNOWN_DATASETS["PACS"].official_lists: where messages say they go
    "https://raw.githubusercontent.com/DeLightCMU/RSC/bf6d280c5d74910f009ea8963c59167252659666/"
    "Domain_Generalization/data/correct_txt_lists",
    (("art_painting_train_kfold.txt", "f2b08879408bc8951cb4e6d79a0ecf8f12c2f9ebd7933499922b87c4e96cd67e"),
     ("art_painting_crossval_kfold.txt", "107df27227941f75cbc871a8db483d9f550d537c925aaaca8cd18eb9cc79c500"),
     ("cartoon_train_kfold.txt", "937e5927d409b3c3aa1f925414dfadf107a3ea734c1f6318fd1223ecbec2449c"),
     ("cartoon_crossval_kfold.txt", "a3e6ad7b3906fda800f7b2f3c34cf9f5702ddc40375ab99cc7a181d14c5330af"),
     ("photo_train_kfold.txt", "4666345041ae3dd447427d46ef8a2b698a4467205dfc0bd0fd0aff636b38ba41"),
     ("photo_crossval_kfold.txt", "94bf87cf84141c9a3b7a5748fd88f910127c73bb471546d585dd9a21be6762f0"),
     ("sketch_train_kfold.txt", "e4b4df3a95f67c65cb4a6daff0baa26954ab622e88df84cd76f839daad601539"),
     ("sketch_crossval_kfold.txt", "eca14c0838824751024868e0e6ecc7380ad0f77dc327ecd3a1f948bdebf92509")),
    "https://github.com/DeLightCMU/RSC (Domain_Generalization/data/correct_txt_lists/)")

SOURCES: dict[str, DataSource] = {
    "PACS": DataSource(
        (Archive("https://drive.google.com/uc?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd", "PACS.zip"),),
        _rename_single("kfold"), "https://domaingeneralization.github.io/", split_lists=_PACS_LISTS),
    "VLCS": DataSource(
        (Archive("https://drive.google.com/uc?id=1skwblH1_okBwxWxmRsp9_qi15hyPpxg8", "VLCS.tar.gz"),),
        _rename_single("VLCS"), "https://github.com/facebookresearch/DomainBed"),
    "OfficeHome": DataSource(
        (Archive("https://drive.google.com/uc?id=1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC",
                 "office_home.zip"),),
        _rename_single("OfficeHomeDataset_10072016"), "https://www.hemanthdv.org/officeHomeDataset.html"),
    "TerraIncognita": DataSource(
        (Archive("https://lilablobssc.blob.core.windows.net/caltechcameratraps/eccv_18_all_images_sm.tar.gz",
                 "eccv_18_all_images_sm.tar.gz"),
         Archive("https://lilablobssc.blob.core.windows.net/caltechcameratraps/labels/"
                 "caltech_camera_traps.json.zip", "caltech_camera_traps.json.zip")),
        _arrange_terra_incognita, "https://lila.science/datasets/caltech-camera-traps"),
    "DomainNet": DataSource(
        tuple(Archive(f"{_DOMAINNET}/{sub}{d}.zip", f"{d}.zip") for sub, d in (
            ("groundtruth/", "clipart"), ("", "infograph"), ("groundtruth/", "painting"),
            ("", "quickdraw"), ("", "real"), ("", "sketch"))),
        _merge_domains, "https://ai.bu.edu/M3SDA/",
        after="DomainBed also removes the images listed in its domain_net_duplicates.txt; this "
              "download keeps them"),
}


def source_name(name: str) -> str:
    """The catalog's spelling of a data-set name given in any case."""
    for key in SOURCES:
        if key.lower() == name.lower():
            return key
    raise UserError(f"unknown data set '{name}'; rise-edge downloads: {', '.join(SOURCES)} "
                    "(the demo world is generated, not downloaded)")


@dataclass
class DownloadResult:
    dataset: str
    path: Path
    already_present: bool
    archives: dict[str, dict[str, object]] = field(default_factory=dict)  # filename -> sha256, bytes
    after: str = ""
    # where the split lists are, and how they came: fetched, given (--split-lists), present or
    # missing (then `warnings` says why and how to fetch them later)
    split_lists: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class SplitListsMissing(UserError):
    """The split lists could not be placed now; the data set itself is complete and usable."""


def missing_parts(path: Path, known: KnownDataset) -> list[str]:
    """What a data-set folder lacks to be complete (domains, classes, images); [] when complete."""
    problems = []
    for domain in known.domains:
        folder = path / domain
        if not folder.is_dir():
            problems.append(f"domain {domain}")
            continue
        classes = {p.name for p in folder.iterdir() if p.is_dir()}
        if known.classes is not None:
            problems += [f"{domain}/{c}" for c in sorted(set(known.classes) - classes)]
        elif not classes:
            problems.append(f"{domain} has no class folders")
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.rglob("*")):
            problems.append(f"{domain} has no images")
    return problems


def download_dataset(name: str, root: Path, *, mirror: str | None = None,
                     archives: Sequence[Path] = (), keep_archives: bool = False,
                     progress: bool = True, split_lists: Path | None = None) -> DownloadResult:
    """Fetch (or take from `archives`, files the user already has), check, extract and arrange data
    set `name` into `root`/<its folder>, and its official split lists (fetched, or checked and
    copied from the folder `split_lists`) into `root`/<their folder>. Never touches an existing
    folder of either name."""
    name = source_name(name)
    source, known = SOURCES[name], KNOWN_DATASETS[name]
    if mirror is not None and not mirror.lower().startswith(("http://", "https://")):
        raise UserError(f"--mirror {mirror}: a mirror is an http:// or https:// address of a folder "
                        "holding the archives (for files you have, use --archive PATH)")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"data root {root} is a file; give a folder (--root or RISE_EDGE_DATA)")
    target = root / known.folder
    given = _match_local_archives(source, archives)
    given_lists = _given_split_lists(name, source, known, split_lists)  # checked before any fetch
    work = root / WORK_FOLDER
    work.mkdir(parents=True, exist_ok=True)
    with run_lock(work / name, "data download", noun="download folder", clean=False):
        if target.exists():
            result = _existing(name, target, known, source)
        else:
            result = _place_dataset(name, root, work, given, mirror, keep_archives, progress)
        if source.split_lists is not None:
            try:
                result.split_lists = _place_split_lists(name, source.split_lists, known, root,
                                                        mirror, given_lists, progress)
            except SplitListsMissing as exc:  # the data set is there and usable all the same
                result.split_lists = {"path": str(root / source.split_lists.folder),
                                      "how": "missing"}
                result.warnings.append(
                    f"{name} is in {target}, but not its split lists: {exc}; the data set is "
                    f"usable: fetch the lists later with `rise-edge data download {name} --root "
                    f"{root}` (it keeps the data set and fetches only them), or give a folder of "
                    "them with --split-lists PATH; until then the recipes that read them stop "
                    "at train time, and --set data.split_lists=\"\" trains on a seeded holdout "
                    "instead")
    return result


def _place_dataset(name: str, root: Path, work: Path, given: dict[str, Path], mirror: str | None,
                   keep_archives: bool, progress: bool) -> DownloadResult:
    """Fetch or take the archives, verify, extract and arrange them; the data set's folder appears
    whole or not at all."""
    source, known = SOURCES[name], KNOWN_DATASETS[name]
    target = root / known.folder
    staging = work / f"{name}.staging"
    if staging.exists():  # a killed extraction: start it over
        shutil.rmtree(staging)
    checksums_path = work / "checksums.json"
    checksums = _read_checksums(checksums_path)
    result = DownloadResult(name, target, False, after=source.after)
    paths = []
    for archive in source.archives:
        if archive.filename in given:
            path = given[archive.filename]
        else:
            path = _fetch(archive, work, mirror, progress)
        digest = _verify(archive, path, checksums.get(archive.filename), downloaded=path.parent == work)
        checksums[archive.filename] = {"sha256": digest, "bytes": path.stat().st_size,
                                       "url": archive.url, "published": archive.sha256 is not None}
        write_json_atomic(checksums_path, checksums)
        result.archives[archive.filename] = checksums[archive.filename]
        paths.append(path)
    staging.mkdir()
    for path in paths:
        _extract(path, staging, progress, ours=path.parent == work)
    source.arrange(staging, staging / known.folder)
    missing = missing_parts(staging / known.folder, known)
    if missing:
        raise UserError(f"the archives of {name} do not make a complete data set (missing: "
                        f"{', '.join(missing[:6])}); nothing was placed in {root}")
    (staging / known.folder).rename(target)  # the data set appears whole or not at all
    shutil.rmtree(staging)
    if not keep_archives:
        for path in paths:
            if path.parent == work:  # never delete an archive the user gave us
                path.unlink()
    return result


def _existing(name: str, target: Path, known: KnownDataset, source: DataSource) -> DownloadResult:
    missing = missing_parts(target, known)
    if missing:
        raise UserError(f"{target} exists but is not a complete {name} (missing: "
                        f"{', '.join(missing[:6])}); it was left as it is: move it away or delete it, "
                        "then run the download again")
    return DownloadResult(name, target, True, after=source.after)


def _match_local_archives(source: DataSource, archives: Sequence[Path]) -> dict[str, Path]:
    wanted = {a.filename for a in source.archives}
    given: dict[str, Path] = {}
    for path in map(Path, archives):
        path = path.expanduser()
        if not path.is_file():
            raise UserError(f"--archive {path}: not a file")
        if path.name not in wanted:
            raise UserError(f"--archive {path}: expected one of {', '.join(sorted(wanted))} (the "
                            "archive's name as published)")
        given[path.name] = path
    return given


def _read_checksums(path: Path) -> dict[str, dict[str, object]]:
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and all(isinstance(v, dict) for v in record.values()):
            return record
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    raise UserError(f"{path} is damaged (not the checksum record rise-edge writes); delete it to "
                    "record the archives' checksums anew")


def _direct_url(url: str) -> str:
    """Google Drive's share links answer large files with a virus-scan page; its download host
    with confirm=t serves the file itself (and honours Range, so downloads resume)."""
    parsed = urlparse(url)
    if parsed.netloc == "drive.google.com" and "id" in parse_qs(parsed.query):
        file_id = parse_qs(parsed.query)["id"][0]
        return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"
    return url


def _fetch(archive: Archive, work: Path, mirror: str | None, progress: bool,
           manual: str = "") -> Path:
    """Download `archive` into `work`, resuming a `.part` left by an earlier attempt. `manual`:
    what the user can do instead, said when the download fails."""
    dest = work / archive.filename
    if dest.is_file():  # finished earlier, extraction did not
        return dest
    url = f"{mirror.rstrip('/')}/{archive.filename}" if mirror else _direct_url(archive.url)
    part = work / f"{archive.filename}.part"
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "rise-edge"}
    if have:
        headers["Range"] = f"bytes={have}-"
    manual = manual or (f"download {archive.filename} from {archive.url} yourself and pass it with "
                        f"--archive PATH")
    try:
        response = urlopen(Request(url, headers=headers), timeout=_TIMEOUT_S)
    except HTTPError as exc:
        if exc.code == 416 and have:  # the part already holds the whole file
            part.rename(dest)
            return dest
        raise UserError(f"{url} answered HTTP {exc.code} ({exc.reason}); {manual}") from None
    except (URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach {urlparse(url).netloc or url} ({reason}); {manual}") from None
    with response:
        if response.headers.get_content_type() == "text/html":
            raise UserError(f"{url} sent a web page instead of {archive.filename} (a quota or a moved "
                            f"file); {manual}")
        if have and response.status != 206:  # the server ignored Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = progress_bar(total=total, initial=have, unit="B", unit_scale=True,
                           unit_divisor=1024, desc=archive.filename, enabled=progress, leave=False)
        with part.open("ab" if have else "wb") as out, bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, HTTPException) as exc:  # a reset connection, a timeout
                    out.flush()
                    raise UserError(f"the download of {archive.filename} stopped after "
                                    f"{part.stat().st_size:,} bytes ({exc or type(exc).__name__}); "
                                    "run the same command again to resume it") from None
                if not chunk:
                    break
                out.write(chunk)  # a full disk raises OSError here: the CLI reports it
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise UserError(f"the download of {archive.filename} stopped after {part.stat().st_size:,} "
                        f"of {total:,} bytes; run the same command again to resume it")
    part.rename(dest)
    return dest


def _verify(archive: Archive, path: Path, recorded: dict | None, *, downloaded: bool) -> str:
    """The archive's sha256, checked against the published one, else the one recorded earlier."""
    digest = file_sha256(path)
    expected = archive.sha256 or (recorded or {}).get("sha256")
    if expected and digest != expected:
        origin = archive.sha256_origin if archive.sha256 else "the checksum recorded when it was first downloaded"
        if downloaded:
            path.unlink()  # a damaged or replaced download: the next run fetches it anew
            fate = "it was removed; run again to download it anew"
        else:
            fate = "your file was left as it is"
        raise UserError(f"{path.name} has sha256 {digest[:16]}..., not {expected[:16]}... "
                        f"({origin}); {fate}")
    return digest


def _extract(path: Path, into: Path, progress: bool, *, ours: bool) -> None:
    """Unpack a zip or tar archive into `into`, refusing members that would land outside it."""
    started = time.monotonic()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                base = into.resolve()
                for member in zf.namelist():
                    if not (into / member).resolve().is_relative_to(base):
                        raise UserError(f"{path.name} holds '{member}', which would be written "
                                        f"outside {into}; refusing to extract it")
                zf.extractall(into)
        elif tarfile.is_tarfile(path):
            with tarfile.open(path) as tf:
                tf.extractall(into, filter="data")  # no absolute paths, links out, devices
        else:
            raise tarfile.ReadError("neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        if ours:
            path.unlink()  # a damaged download: the next run fetches it anew
        raise UserError(f"{path.name} cannot be extracted ({exc}); "
                        f"{'it was removed; run again to download it anew' if ours else 'replace it'}"
                        ) from None
    if progress:
        logger("data").info(f"extracted {path.name} in {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------------------------------------
# Split lists


def _given_split_lists(name: str, source: DataSource, known: KnownDataset, folder: Path | None
                       ) -> dict[str, Path] | None:
    """The lists in the user's `folder` (--split-lists), each checked line by line; None without."""
    if folder is None:
        return None
    spec = source.split_lists
    if spec is None:
        raise UserError(f"--split-lists: {name} has no official split lists (each source domain is "
                        "split by a seeded holdout, data.val_fraction)")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--split-lists {folder}: not a folder; give the folder holding "
                        f"{spec.sha256[0][0]} and the other lists")
    lists = {}
    for filename, _ in spec.sha256:
        path = folder / filename
        if not path.is_file():
            present = ", ".join(sorted(p.name for p in folder.glob("*.txt"))) or "(no .txt files)"
            raise UserError(f"--split-lists {folder}: {filename} is missing (present: {present})")
        check_split_list(path, known)
        lists[filename] = path
    return lists


def check_split_list(path: Path, known: KnownDataset) -> None:
    """A `<domain>_<split>_kfold.txt` list: every line `<path> <label>`, the path inside that domain
    (`<domain>/<class>/<image>`, optionally under the data set's folder) and the label the class's
    1-based place in alphabetical order. UserError at the first line that is not."""
    domain = re.sub(r"_(train|crossval|test)_kfold\.txt$", "", path.name)
    classes = sorted(known.classes or ())
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: a split list is UTF-8 text; this is not") from None
    count = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        parts = fields[0].split("/")
        if parts[0] == known.folder:
            parts = parts[1:]
        label = fields[1] if len(fields) == 2 else ""
        if (len(parts) != 3 or parts[0] != domain or parts[1] not in classes
                or Path(parts[2]).suffix.lower() not in IMAGE_SUFFIXES or not label.isdigit()):
            raise UserError(f"{path}:{n}: expected '<{domain}/class/image> <label>', got {line.strip()!r}")
        if int(label) != classes.index(parts[1]) + 1:
            raise UserError(f"{path}:{n}: label {label} for class {parts[1]}, which is "
                            f"{classes.index(parts[1]) + 1} (1-based, alphabetical)")
        count += 1
    if not count:
        raise UserError(f"{path}: the split list is empty")


def _place_split_lists(name: str, spec: SplitLists, known: KnownDataset, root: Path,
                       mirror: str | None, given: dict[str, Path] | None, progress: bool
                       ) -> dict[str, object]:
    """Fetch (or copy from `given`), verify and place the split lists as `<root>/<spec.folder>/`,
    which appears only once every list is in it; an existing folder is left as it is."""
    dest = root / spec.folder
    if dest.exists():
        missing = [f for f, _ in spec.sha256 if not (dest / f).is_file()]
        if missing:
            raise SplitListsMissing(f"{dest} exists but lacks {', '.join(missing[:3])}"
                                    f"{' and more' if len(missing) > 3 else ''} (it was left as it "
                                    "is: add the missing lists, or move the folder away)")
        return {"path": str(dest), "how": "present"}
    work = root / WORK_FOLDER
    staging = work / f"{spec.folder}.staging"
    if staging.exists():  # a killed run: start over
        shutil.rmtree(staging)
    staging.mkdir()
    checksums_path = work / "checksums.json"
    checksums = _read_checksums(checksums_path)
    manual = (f"they are published at {spec.origin} (any copy of the "
              "<domain>_{train,crossval}_kfold.txt files will do)")
    for archive in spec.archives():
        if given is not None:
            path = given[archive.filename]
            digest, url = file_sha256(path), str(path)
            shutil.copyfile(path, staging / archive.filename)
        else:
            try:
                path = _fetch(archive, work, mirror, progress, manual)
                digest = _verify(archive, path, None, downloaded=True)
                check_split_list(path, known)
            except UserError as exc:
                shutil.rmtree(staging, ignore_errors=True)  # nothing half placed
                raise SplitListsMissing(str(exc)) from None
            path.rename(staging / archive.filename)
            url = archive.url
        checksums[f"{spec.folder}/{archive.filename}"] = {
            "sha256": digest, "bytes": (staging / archive.filename).stat().st_size, "url": url,
            "published": given is None}
    write_json_atomic(checksums_path, checksums)
    staging.rename(dest)  # all the lists or none
    return {"path": str(dest), "how": "given" if given is not None else "fetched",
            "files": len(spec.sha256)}
