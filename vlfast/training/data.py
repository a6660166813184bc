"""Data sources for ``vlfast train``.

* ``synthetic``: batch ``i`` is
  ``model.synthetic_batch(batch_size, generator=Generator().manual_seed(seed * 1_000_003 + i))``;
  the data position is the step index.
* ``csv:PATH``: a CSV with columns ``image`` (path, relative to the CSV's folder or
  absolute), ``caption`` and optionally ``label``.
* ``wds:PATTERN``: webdataset-style tar shards (glob or brace pattern such as
  ``data/{000..003}.tar``); members are grouped by basename; ``.jpg/.jpeg/.png/.webp``
  is the image, ``.txt`` the caption, ``.cls``/``.label`` an optional label.

Real data are read in a seeded random order, a new permutation every epoch (epoch ``e``:
``randperm(N, Generator().manual_seed(seed * 1_000_003 + e))``), or in file order with
``shuffle=False`` (``--no-shuffle``); the data position is the number of samples consumed
over the concatenated epoch orders, and with the seed it is the whole state, so a resumed
run reads exactly what the uninterrupted one reads.  An unreadable image is skipped,
warned about once and counted; it is remembered so a later epoch skips it without
another warning.

Images are decoded by a ``torch.utils.data.DataLoader`` with ``workers`` persistent worker
processes (0: in the training process), each prefetching ``prefetch`` samples, pinned on
CUDA; the loader is fed lazily with this rank's rows of the planned batches, so the samples
of the next steps are decoded while the current step trains.

Data-parallel ranks (``rank``/``world_size``): ``next_batch`` returns rank ``r``'s rows
``[r*B/W, (r+1)*B/W)`` of the global batch ``B``, which is exactly the one process's batch.
For real data each rank decodes only its rows: the ranks exchange the indices that failed
to decode (one small ``all_gather_object`` per batch), every rank marks them bad, and the
rows are re-assigned until no rank saw a new failure; so the skipped set, the data position
and the batch stay identical on every rank and to a single-process run.
"""

import csv
import glob
import io
import os
import re
import sys
import tarfile
from typing import Dict, List, Optional, Tuple

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TEXT_EXTS = (".txt", ".caption")
LABEL_EXTS = (".cls", ".label")


class DataError(Exception):
    """Bad data specification or unreadable data source (reported as one CLI error line)."""


def parse_data_spec(spec: str) -> Tuple[str, Optional[str]]:
    if spec == "synthetic":
        return "synthetic", None
    for kind in ("csv", "wds"):
        if spec.startswith(kind + ":"):
            arg = spec[len(kind) + 1:]
            if not arg:
                raise DataError(f"--data {kind}: needs a path, e.g. {kind}:PATH")
            return kind, arg
    raise DataError(f"unknown --data spec {spec!r}; expected 'synthetic', 'csv:PATH' or 'wds:PATTERN'")


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{000..003}`` ranges (zero padding kept) and ``{a,b}`` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    out = []
    for it in items:
        out.extend(expand_braces(head + it + tail))
    return out


# --------------------------------------------------------------------------- model adapters
class ModelSpec:
    """What a model's batches look like, read off one synthetic batch."""

    def __init__(self, model):
        tmpl = model.synthetic_batch(1, generator=torch.Generator().manual_seed(0))
        self.keys = set(tmpl)
        img = tmpl.get("images", tmpl.get("x1"))
        if img is None:
            raise DataError(f"model {type(model).__name__} takes no images; real data is unsupported")
        self.in_chans, self.image_size = int(img.shape[1]), (int(img.shape[2]), int(img.shape[3]))
        self.text_len = int(tmpl["input_ids"].shape[1]) if "input_ids" in tmpl else None
        self.two_views = "x1" in tmpl and "x2" in tmpl
        self.has_labels = "labels" in tmpl
        unknown = self.keys - {"images", "x1", "x2", "input_ids", "attention_mask", "labels"}
        if unknown:
            raise DataError(f"model {type(model).__name__} needs batch entries {sorted(unknown)} that real data "
                            "(csv:/wds:) does not provide; train it on synthetic data")
        if self.has_labels and tmpl["labels"].dim() != 1:
            raise DataError(f"model {type(model).__name__} takes per-token labels of shape "
                            f"{tuple(tmpl['labels'].shape[1:])} per sample, which real data (csv:/wds: give one class "
                            "label per image) does not provide; train it on synthetic data")

    @property
    def takes_text(self) -> bool:
        return self.text_len is not None


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("real image data needs Pillow: pip install pillow") from None
    return Image


def load_image(src, size: Tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    """Decode (path or bytes), resize the short side, center-crop to ``size`` and normalize (CLIP mean/std)."""
    Image = _pil()
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    with Image.open(src) as im:
        im = im.convert("RGB")
        H, W = size
        w, h = im.size
        scale = max(W / w, H / h)
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - W) // 2, (nh - H) // 2
        im = im.crop((left, top, left + W, top + H))
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(H, W, 3)
    x = t.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    x = (x - mean) / std
    if in_chans != 3:
        x = x.mean(0, keepdim=True).expand(in_chans, H, W).contiguous()
    return x


class _Decode:
    """Map-style dataset of the decoding workers: ``ds[i] -> (i, image (C, H, W) fp32 | None, error | None)``.
    A source is a path or ``(tar shard, data offset, size)`` (read with a plain ``open``: no tar
    handle is shared between processes)."""

    def __init__(self, sources: list, size: Tuple[int, int], in_chans: int):
        self.sources, self.size, self.in_chans = sources, size, in_chans

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src = self.sources[i]
        try:
            if isinstance(src, tuple):
                shard, offset, n = src
                with open(shard, "rb") as f:
                    f.seek(offset)
                    src = f.read(n)
            elif not src:
                raise FileNotFoundError("empty image path")
            return i, load_image(src, self.size, self.in_chans), None
        except Exception as exc:  # corrupt / missing image: reported to the main process, skipped there
            return i, None, f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- sources
def _rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if batch_size % world_size:
        raise DataError(f"the global batch size {batch_size} is not divisible by the {world_size} ranks")
    return slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)


def _union_over_ranks(items: List[int], world_size: int) -> List[int]:
    """Sorted union of every rank's ``items`` (collective when ``world_size > 1``)."""
    if world_size == 1:
        return sorted(set(items))
    import torch.distributed as dist

    out: List[Optional[List[int]]] = [None] * world_size
    dist.all_gather_object(out, list(items))
    return sorted(set(i for part in out for i in part))


class SyntheticData:
    kind = "synthetic"

    def __init__(self, model, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.model, self.batch_size, self.seed = model, batch_size, seed
        self.rows = _rank_rows(batch_size, rank, world_size)
        self.num_samples = None
        self.position = 0  # = steps consumed
        self.skipped = 0

    def next_batch(self) -> Dict[str, torch.Tensor]:
        """This rank's rows of the global synthetic batch (generated whole: it is cheap)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        self.position += 1
        batch = self.model.synthetic_batch(self.batch_size, generator=g)
        return {k: v[self.rows] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        """Nothing to stop (batches are generated in the training process)."""


class _RealData:
    """Fixed-order samples ``(image_src, caption, label)``; subclasses implement ``_read(i)``."""

    kind = "real"

    def __init__(self, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1, *, seed: int = 0,
                 shuffle: bool = True, workers: int = 0, pin_memory: bool = False, prefetch: int = 2):
        self.spec = ModelSpec(model)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rows = _rank_rows(batch_size, rank, world_size)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        self.seed, self.shuffle, self.workers, self.pin_memory, self.prefetch = (
            int(seed), bool(shuffle), workers, bool(pin_memory), prefetch)
        self.position = 0  # samples consumed (stream position over the epochs' orders)
        self.bad = set()  # indices of unreadable samples
        self._perms: Dict[int, List[int]] = {}
        self._iter = None  # the DataLoader iterator, made at the first batch
        self._ready: Dict[int, torch.Tensor] = {}  # decoded, not yet used
        self._errors: Dict[int, str] = {}  # failed to decode, not yet reported
        self._inflight = set()  # asked of the loader, not yet arrived
        self._replan = False
        self.truncated = 0  # captions of this rank's rows longer than the model's context, cut to fit
        self.warn = warn or (lambda msg: print(f"vlfast train: warning: {msg}", file=sys.stderr))
        if self.spec.takes_text:
            from vlfast.models.tokenizer import ByteTokenizer

            self.tokenizer = ByteTokenizer()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def _image(self, i: int):  # -> image source (path or bytes); raises on failure
        raise NotImplementedError

    def _describe(self, i: int) -> str:
        raise NotImplementedError

    # ---- the order: a seeded permutation per epoch (or file order), the same on every rank
    def _order(self, epoch: int) -> List[int]:
        perm = self._perms.get(epoch)
        if perm is None:
            N = self.num_samples
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(N, generator=g).tolist()
            else:
                perm = list(range(N))
            self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def _plan(self, pos: int) -> Tuple[List[int], int]:
        """The global batch starting at stream position ``pos``: the next ``batch_size`` samples not
        known to be bad, and the position after it."""
        N = self.num_samples
        if len(self.bad) >= N:
            raise DataError("no readable image in the data set")
        chosen = []
        while len(chosen) < self.batch_size:
            i = self._order(pos // N)[pos % N]
            pos += 1
            if i not in self.bad:
                chosen.append(i)
        return chosen, pos

    # ---- decoding: a torch DataLoader (``workers`` processes) fed lazily with the planned rows
    @property
    def _ahead(self) -> int:
        """Batches decoded ahead: the prefetch window in batches of this rank's rows, plus two."""
        rows = self.rows.stop - self.rows.start
        return 2 + (self.workers * self.prefetch) // max(1, rows)

    def _requests(self):
        """Sample indices to decode, in the order they will be needed: this rank's rows of the
        planned batches, from the current position on (restarted when a failure changes the plan).
        Within the next :attr:`_ahead` batches nothing decoded, waiting or in flight is asked for
        twice; past them every row is asked for (so the walk never spins on a small data set)."""
        cursor = None
        while True:
            if cursor is None or self._replan:
                cursor, self._replan = self.position, False
            near = cursor - self.position < self._ahead * self.batch_size
            chosen, cursor = self._plan(cursor)
            for i in chosen[self.rows]:
                if self._replan:
                    break
                if near and (i in self._ready or i in self._errors or i in self._inflight):
                    continue
                self._inflight.add(i)
                yield i

    def _loader(self):
        if self._iter is None:
            from torch.utils.data import DataLoader

            w = self.workers
            owner = self

            class _Requests:  # an endless sampler reading the plan at the moment each index is taken
                def __iter__(self):
                    return owner._requests()

            loader = DataLoader(_Decode(self._sources(), self.spec.image_size, self.spec.in_chans), batch_size=None,
                                sampler=_Requests(), num_workers=w, pin_memory=self.pin_memory,
                                prefetch_factor=self.prefetch if w else None, persistent_workers=w > 0)
            self._iter = iter(loader)
        return self._iter

    def _wait_for(self, i: int) -> None:
        """Pull decoded samples until sample ``i`` has arrived (as an image or as an error)."""
        limit = self.batch_size * 4 + self.workers * self.prefetch + 8
        for _ in range(limit):
            if i in self._ready or i in self._errors:
                return
            j, img, err = next(self._loader())
            self._inflight.discard(j)
            if err is None:
                self._ready[j] = img
            else:
                self._errors[j] = err
        raise RuntimeError(f"internal error: sample {i} was never requested from the data loader")

    def close(self) -> None:
        """Stop the decoding workers."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._ready.clear()
        self._errors.clear()
        self._inflight.clear()

    def next_batch(self) -> Dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: the next ``batch_size`` readable samples."""
        _pil()
        while True:
            chosen, pos = self._plan(self.position)
            mine = chosen[self.rows]
            failed = []
            for i in mine:
                self._wait_for(i)
                if i in self._errors and i not in failed:
                    failed.append(i)
                    self.warn(f"skipping unreadable image {self._describe(i)}: {self._errors.pop(i)}")
            failed = _union_over_ranks(failed, self.world_size)
            if not failed:
                break
            self.bad.update(failed)  # every rank: the same set; re-choose the batch
            self._replan = True
        self.position = pos
        images = [self._ready[i] for i in mine]
        keep = set()  # decoded samples of the next planned batches stay; the rest are dropped
        nxt = pos
        for _ in range(self._ahead + 1):
            ahead, nxt = self._plan(nxt)
            keep.update(ahead[self.rows])
        for i in [i for i in self._ready if i not in keep]:
            del self._ready[i]
        captions = [self.samples[i][1] if isinstance(self.samples[i][1], str) else self._caption(i) for i in mine]
        labels = [self.samples[i][2] for i in mine]
        x = torch.stack(images)
        batch: Dict[str, torch.Tensor] = {}
        if self.spec.two_views:
            batch["x1"], batch["x2"] = x, x.flip(-1)
        else:
            batch["images"] = x
        if self.spec.takes_text:
            cut = [c for c in captions if len(self.tokenizer.encode(c)) > self.spec.text_len]
            if cut:
                if not self.truncated:
                    self.warn(f"captions are longer than the model's context of {self.spec.text_len} tokens and "
                              f"are cut (e.g. {cut[0]!r} -> "
                              f"{self.tokenizer.decode(self.tokenizer(cut[0], self.spec.text_len)[0][0])!r}); "
                              "the count is logged as 'truncated_captions'")
                self.truncated += len(cut)
            ids, mask = self.tokenizer(captions, self.spec.text_len)
            batch["input_ids"], batch["attention_mask"] = ids, mask
        if self.spec.has_labels:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def _caption(self, i: int) -> str:
        return ""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "position": self.position, "bad": sorted(self.bad), "shuffle": self.shuffle,
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "shuffle" in state and (bool(state["shuffle"]), int(state["seed"])) != (self.shuffle, self.seed):
            raise DataError(f"the checkpoint's data order (shuffle={state['shuffle']}, seed={state['seed']}) differs "
                            f"from this run's (shuffle={self.shuffle}, seed={self.seed}): resume with the same "
                            "--seed and --shuffle/--no-shuffle")
        self.close()  # decoded-ahead samples belong to the old position
        self.position = int(state["position"])
        self.bad = set(int(i) for i in state.get("bad", ()))
        self._replan = True

    def _sources(self) -> list:
        """What a worker needs to read sample ``i`` (picklable): a path, or (shard, offset, size)."""
        raise NotImplementedError


class CsvData(_RealData):
    kind = "csv"

    def __init__(self, path: str, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1, *,
                 require_captions: bool = True, **pipeline):
        super().__init__(model, batch_size, warn, rank, world_size, **pipeline)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise DataError(f"cannot read CSV {path!r}: {why}") from None
        if not rows:
            raise DataError(f"CSV {path!r} has no rows")
        cols = set(rows[0])
        if "image" not in cols:
            has = ", ".join(sorted(c for c in cols if c)) or "none"
            raise DataError(f"CSV {path!r} needs an 'image' column (has: {has})")
        if self.spec.takes_text and require_captions and "caption" not in cols:
            raise DataError(f"CSV {path!r} needs a 'caption' column for model with text input")
        self.labeled = "label" in cols  # every row has a label (an empty one is refused below)
        base = os.path.dirname(os.path.abspath(path))
        self.samples = []
        for n, r in enumerate(rows):
            img = (r.get("image") or "").strip()
            label = 0
            if self.labeled and r.get("label") in (None, ""):
                raise DataError(f"CSV {path!r} row {n + 2}: empty label")
            if r.get("label") not in (None, ""):
                try:
                    label = int(r["label"])
                except ValueError:
                    raise DataError(f"CSV {path!r} row {n + 2}: label {r['label']!r} is not an integer") from None
            self.samples.append((os.path.join(base, img) if img else "", r.get("caption") or "", label))

    def _image(self, i):
        p = self.samples[i][0]
        if not p:
            raise FileNotFoundError("empty image path")
        return p

    def _describe(self, i):
        return repr(self.samples[i][0])

    def _sources(self):
        return [p for p, _, _ in self.samples]


class WdsData(_RealData):
    kind = "wds"

    def __init__(self, pattern: str, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1, *,
                 require_captions: bool = True, **pipeline):
        super().__init__(model, batch_size, warn, rank, world_size, **pipeline)
        shards = []
        n_labels = 0
        for p in expand_braces(pattern):
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
            if not hits:
                raise DataError(f"no shard matches {p!r}")
            shards.extend(hits)
        self.shards = shards
        self._open: Dict[str, tarfile.TarFile] = {}
        self.samples = []  # (image member ref, caption, label)
        for shard in shards:
            try:
                tf = tarfile.open(shard)
                members = tf.getmembers()
            except (OSError, tarfile.TarError) as exc:
                raise DataError(f"cannot read shard {shard!r}: {exc}") from None
            self._open[shard] = tf
            groups: Dict[str, Dict[str, tarfile.TarInfo]] = {}
            order: List[str] = []
            for m in members:
                if not m.isfile():
                    continue
                d, b = os.path.split(m.name)
                if "." not in b:
                    continue
                key, ext = b.split(".", 1)
                key = os.path.join(d, key)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key]["." + ext.lower()] = m
            for key in order:
                g = groups[key]
                img = next((g[e] for e in IMAGE_EXTS if e in g), None)
                if img is None:
                    continue
                cap = ""
                for e in TEXT_EXTS:
                    if e in g:
                        cap = tf.extractfile(g[e]).read().decode("utf-8", "replace").strip()
                        break
                label = 0
                for e in LABEL_EXTS:
                    if e in g:
                        try:
                            label = int(tf.extractfile(g[e]).read().decode().strip())
                            n_labels += 1
                        except ValueError:
                            pass
                        break
                self.samples.append(((shard, img), cap, label))
        if not self.samples:
            raise DataError(f"no image samples in shards {pattern!r}")
        self.labeled = n_labels == len(self.samples)  # every sample has an integer label

    def _image(self, i):
        shard, member = self.samples[i][0]
        return self._open[shard].extractfile(member).read()

    def _describe(self, i):
        shard, member = self.samples[i][0]
        return f"{member.name!r} in {shard!r}"

    def _sources(self):
        return [(shard, m.offset_data, m.size) for (shard, m), _, _ in self.samples]


def default_workers(local_world_size: int = 1) -> int:
    """Decoding workers per rank when ``--workers`` is not given: the cores left per rank after the
    training process itself, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, local_world_size) - 1))


def build_data(spec: str, model, batch_size: int, seed: int, warn=None, rank: int = 0, world_size: int = 1, *,
               shuffle: bool = True, workers: int = 0, pin_memory: bool = False):
    """The data source of ``--data spec``; ``batch_size`` is the global batch, of which
    ``next_batch()`` returns rank ``rank``'s rows (see the module docstring).  Real data:
    ``shuffle`` (a permutation per epoch from ``seed``), ``workers`` decoding processes,
    ``pin_memory`` (CUDA)."""
    kind, arg = parse_data_spec(spec)
    if kind == "synthetic":
        return SyntheticData(model, batch_size, seed, rank, world_size)
    cls = CsvData if kind == "csv" else WdsData
    return cls(arg, model, batch_size, warn, rank, world_size, seed=seed, shuffle=shuffle, workers=workers,
               pin_memory=pin_memory)
