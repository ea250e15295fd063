"""The teacher-view cache: the CLIP teacher's image embedding of every training view, computed once.

For each source image (keyed by the sha256 of its bytes) and view k < K (rise_edge.data.views): the
view's parameters and the teacher's L2-normalised image embedding of it, fp16. A run that uses the
cache replays view (image, k) for the student from the stored parameters and reads the embedding
instead of running the teacher; zero-shot logits are recomputed from it and the class text
(prompts, logit scale and tau may change without a rebuild). Only KD's term needs the teacher's
image side; AD and RD use text, so nothing else changes.

    <cache_dir>/<key>/header.json               what the key covers (refused when it disagrees)
    <cache_dir>/<key>/shard-<hash>.safetensors  digests (n, 32) u8, params (n, K, 14) f32,
                                                embeddings (n, K, D) f16, checksums (n, 32) u8
The key covers everything that changes an embedding: the teacher (model, sha256 of its weights,
its input preprocessing), the student's preprocessing (views are embedded as the student sees
them), the view spec and K. The teacher's precision is not in it: a cache filled in fp16 on a GPU
serves fp32 runs on a CPU, and every run re-embeds a sample of its entries (cosine >= MIN_COSINE,
else the cache is refused with one line). Shards are written whole under a temporary name and
renamed, so a kill leaves complete shards only and a fill resumes from them; each entry carries a
sha256 checksum, and a damaged one is rebuilt by the next fill (or the cache refused, where none
may run). Fillers take an flock on the key's folder, so two runs filling at once embed each image once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from rise_edge.logs import logger
from rise_edge.data.transforms import Preprocessing
from rise_edge.data.views import PARAMS, ViewImages, ViewSpec, apply_view, read_image, sample_view
from rise_edge.errors import UserError
from rise_edge.files import atomic_path, cache_key, cache_root, exclusive_lock, write_json_atomic
from rise_edge.train.teacher import ClipTeacher

FORMAT = 1
MIN_COSINE = 0.999     # re-embedded entries must agree with the stored ones at least this well
VERIFY_ENTRIES = 4     # entries re-embedded per run
SHARD_IMAGES = 512     # images per shard: what a kill can cost a fill
HEADER = "header.json"
Log = Callable[[str], None]


def size_text(n: float) -> str:
    """Bytes as a short figure: 12.3 KiB, 4.0 MiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _stderr(line: str) -> None:
    logger("train").info(line)


def default_dir(cache_dir: str) -> Path:
    """teacher.cache_dir, or <rise-edge cache>/teacher_views when it is empty."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "teacher_views"


def weights_digest(teacher: ClipTeacher) -> str:
    """sha256 of the teacher's weights: of its files where it was loaded from files (the same
    whatever precision it runs in), else of its parameters (random weights)."""
    cached = getattr(teacher, "_weights_digest", None)
    if cached:
        return cached
    digest = hashlib.sha256()
    files = getattr(teacher, "weights_files", ())
    if files:
        for path in sorted(Path(p) for p in files):
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    else:
        for name, tensor in sorted(teacher.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    teacher._weights_digest = digest.hexdigest()
    return teacher._weights_digest


def key_fields(teacher: ClipTeacher, pre: Preprocessing, spec: ViewSpec, views: int) -> dict[str, Any]:
    """Everything that changes a cached embedding, as JSON: the cache's key is its hash."""
    return {"format": FORMAT, "teacher": teacher.identity.split("|")[0],
            "weights_sha256": weights_digest(teacher),
            "teacher_preprocessing": {"image_size": teacher.image_size,
                                      "mean": [round(float(v), 8) for v in teacher.mean.flatten()],
                                      "std": [round(float(v), 8) for v in teacher.std.flatten()],
                                      "input_statistics": "teacher" if teacher.own_statistics
                                      else "student", "resize": "bicubic-antialias"},
            "student_preprocessing": pre.to_dict(), "views": spec.to_dict(), "K": views}


def hash_images(paths: Sequence[str]) -> list[bytes]:
    """sha256 digests of the images' bytes, in order (threads: reading is I/O)."""
    def one(path: str) -> bytes:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, paths, chunksize=64))


def entry_checksum(digest: bytes, params: torch.Tensor, embedding: torch.Tensor) -> bytes:
    """sha256 over one entry: the image digest, its K views' parameters and embeddings."""
    h = hashlib.sha256(digest)
    h.update(params.contiguous().numpy().tobytes())
    h.update(embedding.contiguous().view(torch.int16).numpy().tobytes())
    return h.digest()


@dataclass
class Entries:
    """The cached views of a run's images, in sample order: params (N, K, PARAMS) float32 and
    embeddings (N, K, D) float16; `missing` the sample indices not (validly) cached."""

    params: torch.Tensor
    embeddings: torch.Tensor
    missing: list[int]
    damaged: int


class TeacherViewCache:
    """One key's folder of shards (see the module docstring)."""

    def __init__(self, root: Path, fields: dict[str, Any]):
        self.fields = fields
        self.key = cache_key(**fields)[:16]
        self.folder = Path(root) / self.key
        self.views = int(fields["K"])
        self.preprocessing = Preprocessing.from_dict(fields["student_preprocessing"])
        self.spec = ViewSpec(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields["views"].items()})

    @classmethod
    def for_teacher(cls, root: Path, teacher: ClipTeacher, pre: Preprocessing, spec: ViewSpec,
                    views: int) -> TeacherViewCache:
        return cls(root, key_fields(teacher, pre, spec, views))

    # -- reading ----------------------------------------------------------------------------------

    def check_header(self) -> dict[str, Any] | None:
        """The header, None when the folder has none yet; refuses one that disagrees with the key."""
        path = self.folder / HEADER
        if not path.is_file():
            return None
        try:
            header = json.loads(path.read_text())
            recorded = header["key"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"teacher-view cache {self.folder}: {HEADER} is unreadable (damaged?); "
                            "delete the folder to rebuild it, or set teacher.cache=off") from None
        if recorded != self.fields:
            changed = sorted(k for k in set(recorded) | set(self.fields)
                             if recorded.get(k) != self.fields.get(k))
            raise UserError(f"teacher-view cache {self.folder}: its {HEADER} records another key "
                            f"({', '.join(changed)} differ); it was changed by hand or damaged: delete "
                            "the folder to rebuild it, or set teacher.cache=off")
        return header

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else []

    def _read_shard(self, path: Path) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
            n = tensors["digests"].shape[0]
            ok = (tensors["params"].shape[:2] == (n, self.views) and tensors["checksums"].shape
                  == (n, 32) and tensors["embeddings"].shape[:2] == (n, self.views))
        except Exception:  # a truncated or overwritten file: safetensors raises several types
            return None
        return tensors if ok else None

    def lookup(self, digests: Sequence[bytes]) -> Entries:
        """The cached entries of these images (checksums verified); absent or damaged ones missing."""
        self.check_header()
        wanted: dict[bytes, list[int]] = {}
        for i, d in enumerate(digests):
            wanted.setdefault(d, []).append(i)
        params = torch.zeros(len(digests), self.views, PARAMS)
        embeddings: torch.Tensor | None = None
        found: set[int] = set()
        damaged = 0
        for path in self.shards():
            tensors = self._read_shard(path)
            if tensors is None:
                damaged += 1
                continue
            for row, raw in enumerate(tensors["digests"]):
                digest = bytes(raw.tolist())
                rows = [i for i in wanted.get(digest, ()) if i not in found]
                if not rows:
                    continue
                p, e = tensors["params"][row], tensors["embeddings"][row]
                if entry_checksum(digest, p, e) != bytes(tensors["checksums"][row].tolist()):
                    damaged += 1
                    continue
                if embeddings is None:
                    embeddings = torch.zeros(len(digests), self.views, e.shape[-1],
                                             dtype=torch.float16)
                params[rows], embeddings[rows] = p, e
                found.update(rows)
        if embeddings is None:
            embeddings = torch.zeros(len(digests), self.views, 0, dtype=torch.float16)
        missing = [i for i in range(len(digests)) if i not in found]
        return Entries(params, embeddings, missing, damaged)

    def info(self) -> dict[str, Any]:
        """What the folder holds: entries (images), views, bytes."""
        header = self.check_header()
        shards = self.shards()
        images = 0
        for path in shards:
            tensors = self._read_shard(path)
            images += 0 if tensors is None else tensors["digests"].shape[0]
        return {"folder": str(self.folder), "key": self.key, "K": self.views, "images": images,
                "shards": len(shards), "bytes": sum(p.stat().st_size for p in shards),
                "dim": header.get("dim") if header else None, "fields": self.fields,
                "built_with": header.get("built_with") if header else None}

    # -- filling ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _fill_lock(self, log: Log) -> Iterator[None]:
        """An flock on the key's folder: one filler at a time (a second waits, saying so); the
        kernel releases it at exit, kill -9 included."""
        def wait(_: int) -> None:
            log(f"teacher-view cache {self.folder}: another process is filling it; waiting")

        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.folder / ".fill.lock", busy=wait))
            except OSError as exc:
                raise UserError(f"cannot fill teacher-view cache {self.folder}: "
                                f"{exc.strerror or exc}; set teacher.cache_dir to a writable "
                                "folder, or teacher.cache=off") from None
            yield

    def estimate_bytes(self, images: int, dim: int) -> int:
        """Bytes `images` more entries take on disk (safetensors header aside)."""
        return images * (self.views * (2 * dim + 4 * PARAMS) + 64)

    def fill(self, teacher: ClipTeacher, paths: Sequence[str], *, digests: Sequence[bytes] | None = None,
             batch: int = 256, workers: int = 0, log: Log = _stderr) -> dict[str, Any]:
        """Embed every view of the images not (validly) cached yet; returns what it did. Holds the
        fill lock; resumes from the shards a killed fill left; rewrites damaged shards."""
        pre, spec = self.preprocessing, self.spec
        digests = list(digests) if digests is not None else hash_images(paths)
        started = time.perf_counter()
        with self._fill_lock(log):
            self.check_header()
            for leftover in self.folder.glob(".shard-*.tmp"):  # a killed filler's; none is live
                leftover.unlink(missing_ok=True)
            self._drop_damaged(log)
            entries = self.lookup(digests)
            unique: dict[bytes, str] = {}
            for i in entries.missing:
                unique.setdefault(digests[i], paths[i])
            todo = list(unique.items())
            report = {"images": len(todo), "views": len(todo) * self.views, "seconds": 0.0,
                      "bytes": 0, "folder": str(self.folder)}
            if not todo:
                return report
            probe = torch.zeros(1, 3, pre.input_size, pre.input_size, device=teacher.mean.device)
            dim = int(teacher.encode_images(probe, pre).shape[-1])
            self._check_space(len(todo), dim)
            if not (self.folder / HEADER).is_file():
                write_json_atomic(self.folder / HEADER, {
                    "key": self.fields, "dim": dim,
                    "built_with": {"device": str(teacher.mean.device), "precision": str(teacher.dtype),
                                   "torch": torch.__version__}})
            log(f"teacher-view cache {self.folder}: embedding {len(todo)} image(s) x {self.views} "
                f"views, about {size_text(self.estimate_bytes(len(todo), dim))}")
            for start in range(0, len(todo), SHARD_IMAGES):
                chunk = todo[start:start + SHARD_IMAGES]
                params, embeddings = self._embed(teacher, pre, spec, chunk, batch, workers)
                report["bytes"] += self._write_shard([d for d, _ in chunk], params, embeddings,
                                                     stored=start, total=len(todo))
        report["seconds"] = time.perf_counter() - started
        return report

    def _check_space(self, images: int, dim: int) -> None:
        need = self.estimate_bytes(images, dim)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise UserError(f"teacher-view cache {self.folder} needs about {size_text(need)} for "
                            f"{images} image(s) x {self.views} views, and {size_text(free)} are "
                            "free; free some space, lower teacher.cache_views, or set teacher.cache_dir "
                            "elsewhere (nothing was written)")

    def _embed(self, teacher: ClipTeacher, pre: Preprocessing, spec: ViewSpec,
               chunk: list[tuple[bytes, str]], batch: int, workers: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Params (n, K, PARAMS) and fp16 embeddings (n, K, D) of every view of `chunk`'s images."""
        loader = DataLoader(_AllViews(chunk, pre, spec, self.views), num_workers=workers,
                            batch_size=max(1, batch // self.views))
        params, embeddings = [], []
        device = teacher.mean.device
        for p, images in loader:  # p (b, K, P), images (b, K, 3, S, S)
            flat = images.flatten(0, 1).to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=False):
                e = teacher.encode_images(flat, pre)
            params.append(p)
            embeddings.append(e.view(p.shape[0], self.views, -1).to(torch.float16).cpu())
        return torch.cat(params), torch.cat(embeddings)

    def _write_shard(self, digests: list[bytes], params: torch.Tensor, embeddings: torch.Tensor,
                     *, stored: int, total: int) -> int:
        """One shard, written under a temporary name and renamed; a full disk is one line."""
        from safetensors.torch import save_file

        checksums = [entry_checksum(d, p, e) for d, p, e in zip(digests, params, embeddings)]
        tensors = {"digests": torch.tensor([list(d) for d in digests], dtype=torch.uint8),
                   "params": params.contiguous(), "embeddings": embeddings.contiguous(),
                   "checksums": torch.tensor([list(c) for c in checksums], dtype=torch.uint8)}
        path = self.folder / f"shard-{hashlib.sha256(b''.join(digests)).hexdigest()[:16]}.safetensors"
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"key": self.key})
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"disk full writing teacher-view cache {self.folder}: {stored} of "
                                f"{total} image(s) stored in complete shards, nothing lost; free some "
                                "space and run again (it resumes)") from None
            raise
        return path.stat().st_size

    def _drop_damaged(self, log: Log) -> None:
        """Under the fill lock: rewrite each damaged shard without its damaged entries (a shard that
        cannot be read at all is moved aside as .damaged), so the fill embeds them again."""
        for path in self.shards():
            tensors = self._read_shard(path)
            if tensors is None:
                path.rename(path.with_suffix(".damaged"))
                log(f"teacher-view cache: {path.name} is damaged (unreadable); moved aside, its "
                    "entries are rebuilt")
                continue
            good = [r for r in range(tensors["digests"].shape[0]) if entry_checksum(
                bytes(tensors["digests"][r].tolist()), tensors["params"][r], tensors["embeddings"][r])
                == bytes(tensors["checksums"][r].tolist())]
            if len(good) == tensors["digests"].shape[0]:
                continue
            log(f"teacher-view cache: {tensors['digests'].shape[0] - len(good)} damaged entr"
                f"{'y' if len(good) + 1 == tensors['digests'].shape[0] else 'ies'} in {path.name} "
                "(checksum); rebuilt")
            from safetensors.torch import save_file
            with atomic_path(path) as tmp:
                save_file({k: v[good].contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"key": self.key})


class _AllViews(Dataset):
    """Item i: every view of image i of a fill chunk: (params (K, PARAMS), views (K, 3, S, S))."""

    def __init__(self, chunk: list[tuple[bytes, str]], pre: Preprocessing, spec: ViewSpec, views: int):
        self.chunk, self.pre, self.spec, self.views = chunk, pre, spec, views

    def __len__(self) -> int:
        return len(self.chunk)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        digest, path = self.chunk[i]
        image, read_digest = read_image(path)
        if read_digest != digest:
            raise UserError(f"{path} changed while the teacher-view cache was being filled; run again")
        params = torch.stack([sample_view(self.spec, digest, k, image.height, image.width)
                              for k in range(self.views)])
        return params, torch.stack([apply_view(image, p, self.spec, self.pre) for p in params])


def verify(cache: TeacherViewCache, teacher: ClipTeacher, paths: Sequence[str], entries: Entries,
           *, count: int = VERIFY_ENTRIES, seed: int = 0) -> float:
    """Re-embed `count` cached views (a seeded choice) with this teacher; the lowest cosine to the
    stored embeddings. Below MIN_COSINE the cache is refused with one line."""
    from rise_edge.data.domains import load_rgb

    pre, spec = cache.preprocessing, cache.spec
    absent = set(entries.missing)
    present = [i for i in range(len(paths)) if i not in absent]
    if not present:
        return 1.0
    g = torch.Generator().manual_seed(seed)
    picks = [present[int(j)] for j in torch.randperm(len(present), generator=g)[:count]]
    ks = [int(torch.randint(0, cache.views, (1,), generator=g)) for _ in picks]
    views = torch.stack([apply_view(load_rgb(paths[i]), entries.params[i, k], spec, pre)
                         for i, k in zip(picks, ks)])
    fresh = teacher.encode_images(views.to(teacher.mean.device), pre).float().cpu()
    stored = torch.stack([entries.embeddings[i, k] for i, k in zip(picks, ks)]).float()
    cosine = float(torch.nn.functional.cosine_similarity(fresh, stored, dim=-1).min())
    if cosine < MIN_COSINE:
        raise UserError(f"teacher-view cache {cache.folder}: re-embedding {len(picks)} of its views "
                        f"with this run's teacher gives cosine {cosine:.4f} < {MIN_COSINE} (another "
                        "teacher, or damaged entries with valid checksums); delete the folder to "
                        "rebuild it, or set teacher.cache=off")
    return cosine


# ---------------------------------------------------------------------------------------------------
# A run's views


def training_views(recipe: Any, samples: Sequence[tuple[str, int]], pre: Preprocessing,
                   objective: torch.nn.Module, log: Log = _stderr
                   ) -> tuple[ViewImages, torch.Tensor | None, dict[str, Any]]:
    """The run's training set as views, the cached teacher embeddings (N, K, D) fp16 when the
    teacher-view cache serves the run (else None), and what was decided, for results.json.

    The cache serves only methods whose objective takes the teacher's image side (KD's term); a
    single run fills it with its own source images only (`samples`), never the target's."""
    from rise_edge.train.objectives import TeacherObjective

    cfg, views = recipe.teacher, recipe.teacher.cache_views
    spec = ViewSpec.of(pre, recipe.train.augment)
    on_the_fly = ViewImages(samples, pre, spec, recipe.train.seed, views)
    record: dict[str, Any] = {"views_per_image": views or "fresh every epoch", "cache": "off"}
    uses_image_side = isinstance(objective, TeacherObjective) and objective.cfg.w_kd > 0
    if cfg.cache == "off" or not uses_image_side:
        return on_the_fly, None, record
    if views == 0:
        if cfg.cache == "on":
            raise UserError("teacher.cache=on needs teacher.cache_views > 0 (the views per image "
                            "the cache holds, e.g. --set teacher.cache_views=20)")
        return on_the_fly, None, record
    cache = TeacherViewCache.for_teacher(default_dir(cfg.cache_dir), objective.teacher, pre, spec,
                                         views)
    paths = [p for p, _ in samples]
    digests = hash_images(paths)
    entries = cache.lookup(digests)
    if entries.missing and cfg.cache == "auto":
        log(f"note: teacher-view cache {cache.folder} holds {len(paths) - len(entries.missing)} of "
            f"this run's {len(paths)} training images: the teacher runs on the fly "
            "(teacher.cache=on fills it; a sweep fills it before its runs)")
        return on_the_fly, None, {**record, "cache": "auto: incomplete, on the fly"}
    filled = None
    if entries.missing:
        filled = cache.fill(objective.teacher, paths, digests=digests, log=log)
        entries = cache.lookup(digests)
        if entries.missing:
            raise UserError(f"teacher-view cache {cache.folder} still lacks {len(entries.missing)} "
                            "entries after filling it (damaged while in use?); run again, or set "
                            "teacher.cache=off")
    cosine = verify(cache, objective.teacher, paths, entries, seed=recipe.train.seed)
    cached = ViewImages(samples, pre, spec, recipe.train.seed, views, entries.params)
    return cached, entries.embeddings, {**record, "cache": "used", "folder": str(cache.folder),
                                        "key": cache.key, "verified_min_cosine": round(cosine, 6),
                                        **({"filled": filled} if filled else {})}
