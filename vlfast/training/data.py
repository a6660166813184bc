"""Data sources for ``vlfast train``.

* ``synthetic``: batch ``i`` is
  ``model.synthetic_batch(batch_size, generator=Generator().manual_seed(seed * 1_000_003 + i))``;
  the data position is the step index.
* ``csv:PATH``: a CSV with columns ``image`` (path, relative to the CSV's folder or
  absolute), ``caption`` and optionally ``label``.
* ``wds:PATTERN``: webdataset-style tar shards (glob or brace pattern such as
  ``data/{000..003}.tar``); members are grouped by basename; ``.jpg/.jpeg/.png/.webp``
  is the image, ``.txt`` the caption, ``.cls``/``.label`` an optional label.

Real data are read in a fixed order (no shuffle); the data position is the number of
samples consumed (wrapping around at epoch ends).  An unreadable image is skipped,
warned about once and counted; it is remembered so a later epoch skips it without
another warning.

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


class _RealData:
    """Fixed-order samples ``(image_src, caption, label)``; subclasses implement ``_read(i)``."""

    kind = "real"

    def __init__(self, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1):
        self.spec = ModelSpec(model)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rows = _rank_rows(batch_size, rank, world_size)
        self.position = 0  # samples consumed
        self.bad = set()  # indices of unreadable samples
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

    def next_batch(self) -> Dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: the next ``batch_size`` readable samples."""
        _pil()
        N = self.num_samples
        decoded: Dict[int, torch.Tensor] = {}
        while True:
            if len(self.bad) >= N:
                raise DataError("no readable image in the data set")
            chosen, pos = [], self.position
            while len(chosen) < self.batch_size:  # the global batch, skipping known-bad samples
                i = pos % N
                pos += 1
                if i not in self.bad:
                    chosen.append(i)
            mine = chosen[self.rows]
            failed = []
            for i in mine:
                if i in decoded or i in failed:
                    continue
                try:
                    decoded[i] = load_image(self._image(i), self.spec.image_size, self.spec.in_chans)
                except Exception as exc:  # corrupt / missing image: skip, count, never fatal
                    failed.append(i)
                    self.warn(f"skipping unreadable image {self._describe(i)}: {type(exc).__name__}: {exc}")
            failed = _union_over_ranks(failed, self.world_size)
            if not failed:
                break
            self.bad.update(failed)  # every rank: the same set; re-choose the batch
        self.position = pos
        images = [decoded[i] for i in mine]
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
        return {"kind": self.kind, "position": self.position, "bad": sorted(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.bad = set(int(i) for i in state.get("bad", ()))


class CsvData(_RealData):
    kind = "csv"

    def __init__(self, path: str, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1, *,
                 require_captions: bool = True):
        super().__init__(model, batch_size, warn, rank, world_size)
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


class WdsData(_RealData):
    kind = "wds"

    def __init__(self, pattern: str, model, batch_size: int, warn=None, rank: int = 0, world_size: int = 1, *,
                 require_captions: bool = True):
        super().__init__(model, batch_size, warn, rank, world_size)
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


def build_data(spec: str, model, batch_size: int, seed: int, warn=None, rank: int = 0, world_size: int = 1):
    """The data source of ``--data spec``; ``batch_size`` is the global batch, of which
    ``next_batch()`` returns rank ``rank``'s rows (see the module docstring)."""
    kind, arg = parse_data_spec(spec)
    if kind == "synthetic":
        return SyntheticData(model, batch_size, seed, rank, world_size)
    if kind == "csv":
        return CsvData(arg, model, batch_size, warn, rank, world_size)
    return WdsData(arg, model, batch_size, warn, rank, world_size)
