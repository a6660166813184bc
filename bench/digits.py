"""Zero-shot CLIP on real data: scikit-learn's 8x8 digits through ``vlfast train`` and ``vlfast eval``.

::

    python -m vlfast.bench.digits --out runs/digits [--steps 469] [--batch-size 64] [--seed 0] [--train-frac 0.8]
    make digits                      # installs scikit-learn into the venv, then the line above

(from the repository root ``python -m bench.digits ...`` runs the same file.)

1. :func:`write_dataset` writes the 1797 digits (``sklearn.datasets.load_digits``: data shipped in the
   package, no download) as grayscale PNGs upscaled to the model's image size (nearest neighbour:
   each digit pixel becomes an exact block) into ``OUT/data/images/``, with ``train.csv`` and
   ``test.csv`` (columns ``image,caption,label``, the layout ``--data csv:PATH`` reads; a seeded
   split, :func:`split_indices`) and ``classnames.txt`` (one name per line, in label order).
   Each caption is the bare class name: clip_micro's context is 16 byte tokens (``[CLS]`` and
   ``[SEP]`` included), so "a photo of the digit six" would be cut to "a photo of the d" for every
   class and nothing could be learned (issue #14); :func:`check_captions_fit` refuses a name that
   would be cut.
2. ``python -m vlfast train --model clip_micro --data csv:OUT/data/train.csv ...`` into ``OUT/run``.
3. ``python -m vlfast eval --task zeroshot --classnames OUT/data/classnames.txt --prompt "{}"`` and
   ``--task retrieval`` on ``csv:OUT/data/test.csv``.
4. One JSON line on stdout (also ``OUT/summary.json``): data set sizes, steps, wall times, the
   first and last training losses (beside ``ln(batch)``, the loss of a model that has learned
   nothing), zero-shot top-1/top-5 and retrieval R@1.

Retrieval with class names as captions: the test set holds many copies of each caption, which
encode to the same text feature.  Image->text R@1 counts a query as found when no text scores
strictly above its own caption, so ties with same-class copies do not count against it and it
equals zero-shot top-1 up to float ties; text->image R@1 asks for the one image of a caption among
all images of its class, so its ceiling is about ``classes / test samples``.  Zero-shot top-1 is
the figure to read.

:func:`run_pipeline` takes the arrays (``images (N, h, w)``, ``labels (N,)``), so it runs on any
small gray-image set (the tests use random arrays without scikit-learn).  Subprocesses stream
their logs to stderr; stdout carries only the summary line.  Exit status: 0 done, 1 a training or
evaluation command failed, 2 bad arguments or scikit-learn missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["CLASSNAMES", "DigitsData", "split_indices", "write_dataset", "check_captions_fit", "check_settings",
           "run_pipeline", "load_sklearn_digits", "main"]

#: The class-name sets ``--classnames`` chooses between (label ``i`` is ``names[i]``).
CLASSNAMES: Dict[str, Tuple[str, ...]] = {
    "words": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "digits": tuple(str(i) for i in range(10)),
}
#: scikit-learn's digits are 4-bit counts: 0 (white) .. 16 (black).
SKLEARN_MAX_VALUE = 16.0

CSV_COLUMNS = ("image", "caption", "label")


@dataclass(frozen=True)
class DigitsData:
    """What :func:`write_dataset` wrote: the folder, the two CSVs, the class-name file and the split."""

    root: Path
    train_csv: Path
    test_csv: Path
    classnames_file: Path
    train_indices: Tuple[int, ...]  # rows of the input arrays in train.csv, in file order
    test_indices: Tuple[int, ...]

    @property
    def n_train(self) -> int:
        return len(self.train_indices)

    @property
    def n_test(self) -> int:
        return len(self.test_indices)


def split_indices(n: int, train_frac: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)``: ``(train, test)`` index arrays, each sorted.

    ``round(n * train_frac)`` samples go to train (``numpy.random.default_rng(seed).permutation``);
    both parts must be non-empty."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2 (one sample per split at least), got {n!r}")
    if isinstance(train_frac, bool) or not isinstance(train_frac, (int, float)) or not 0 < train_frac < 1:
        raise ValueError(f"train_frac must be a number in (0, 1), got {train_frac!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    n_train = int(round(n * train_frac))
    if not 0 < n_train < n:
        raise ValueError(f"train_frac={train_frac} of n={n} samples leaves a split empty ({n_train} train)")
    perm = np.random.default_rng(int(seed)).permutation(n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def _check_classnames(classnames: Sequence[str]) -> List[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a sequence of str, got {type(classnames).__name__}")
    names = list(classnames)
    for c in names:
        if not isinstance(c, str):
            raise TypeError(f"classnames must hold str, got {type(c).__name__}")
        if not c.strip() or c != c.strip() or "\n" in c or "\r" in c:
            raise ValueError(f"classnames: {c!r} is empty, has surrounding blanks or a line break "
                             "(classnames.txt holds one stripped name per line)")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"classnames must be non-empty and distinct, got {names!r}")
    return names


def write_dataset(images, labels, out, *, classnames: Sequence[str], image_size: int, train_frac: float = 0.8,
                  seed: int = 0, max_value: Optional[float] = None) -> DigitsData:
    """Write a gray-image classification set in the layout of ``vlfast train --data csv:PATH``.

    Args:
        images: ``(N, h, w)`` array of non-negative intensities (ink = high, as scikit-learn's digits);
            pixel ``v`` is drawn as gray ``255 - round(255 * min(v / max_value, 1))`` (black ink on
            white), upscaled to ``image_size x image_size`` by nearest neighbour.
        labels: ``(N,)`` integers in ``[0, len(classnames))``.
        out: the folder to write (created; must not hold a ``train.csv``/``test.csv`` already).
        classnames: one name per class, in label order; sample ``i``'s caption is ``classnames[labels[i]]``.
        image_size: side of the written PNGs (the model's image size: no resize when the trainer reads them).
        train_frac, seed: the split (:func:`split_indices`).
        max_value: the intensity drawn as full ink (default: ``images.max()``, or 1 for an all-zero array).

    Writes ``images/NNNNN.png`` (``N`` = the row of the input arrays), ``train.csv`` and ``test.csv``
    (columns ``image,caption,label``; image paths relative to the CSV) and ``classnames.txt``.
    """
    from PIL import Image

    names = _check_classnames(classnames)
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"images must have shape (N >= 2, h, w), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"images must hold numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("images must be finite and non-negative")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        raise ValueError(f"labels must have shape ({arr.shape[0]},) to match images, got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.min() < 0 or lab.max() >= len(names):
        raise ValueError(f"labels must lie in [0, {len(names)}) (one class name each), got [{lab.min()}, {lab.max()}]")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if max_value is None:
        max_value = float(arr.max()) or 1.0
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) or not (max_value > 0
                                                                                      and math.isfinite(max_value)):
        raise ValueError(f"max_value must be a positive number, got {max_value!r}")
    train_idx, test_idx = split_indices(arr.shape[0], train_frac, seed)

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "test.csv"):
        if (root / name).exists():
            raise FileExistsError(f"{root / name} exists: write_dataset writes a fresh folder")
    (root / "images").mkdir(exist_ok=True)
    gray = 255 - np.rint(255.0 * np.clip(arr.astype(np.float64) / max_value, 0.0, 1.0)).astype(np.uint8)
    width = max(5, len(str(arr.shape[0] - 1)))
    rel = [f"images/{i:0{width}d}.png" for i in range(arr.shape[0])]
    for i in range(arr.shape[0]):
        Image.fromarray(gray[i], mode="L").resize((image_size, image_size), Image.NEAREST).save(root / rel[i])

    def write_csv(path: Path, idx: np.ndarray) -> None:
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for i in idx:
                w.writerow((rel[i], names[int(lab[i])], int(lab[i])))

    write_csv(root / "train.csv", train_idx)
    write_csv(root / "test.csv", test_idx)
    (root / "classnames.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    return DigitsData(root, root / "train.csv", root / "test.csv", root / "classnames.txt",
                      tuple(int(i) for i in train_idx), tuple(int(i) for i in test_idx))


def check_captions_fit(classnames: Sequence[str], context_length: int) -> None:
    """Raise ``ValueError`` if a class name, encoded by the byte tokenizer with ``[CLS]``/``[SEP]``,
    is longer than the model's text context (it would be cut, and cut names can collide)."""
    from vlfast.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    long = [c for c in _check_classnames(classnames) if len(tok.encode(c)) > context_length]
    if long:
        raise ValueError(f"classnames {long!r} exceed the model's text context of {context_length} tokens "
                         f"({context_length - 2} bytes plus [CLS] and [SEP]) and would be cut")


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``images (1797, 8, 8)`` float64 in ``[0, 16]``, ``labels (1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError("the digits benchmark needs scikit-learn: .venv/bin/pip install scikit-learn "
                                  "(or run `make digits`)", name="sklearn") from None
    d = load_digits()
    return np.asarray(d.images), np.asarray(d.target)


def _vlfast(args: List[str], *, threads: int, capture: bool) -> str:
    """Run ``python -m vlfast ARGS``; its stderr (and stdout unless ``capture``) go to our stderr.
    Returns the captured stdout; raises ``RuntimeError`` naming the command on a non-zero exit."""
    cmd = [sys.executable, "-m", "vlfast", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"digits: $ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE if capture else sys.stderr, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited with status {r.returncode} (its log is above)")
    return r.stdout if capture else ""


def _last_json(stdout: str, what: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"{what} printed nothing on stdout")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{what}: the last stdout line is not JSON ({exc}): {lines[-1]!r}") from None


def _losses(metrics_file: Path) -> List[float]:
    """The per-step training losses of ``metrics.jsonl``, in step order (evaluation records skipped)."""
    steps = {}
    with open(metrics_file, encoding="utf-8") as f:
        for ln in f:
            rec = json.loads(ln)
            if "loss" in rec and "step" in rec:
                steps[int(rec["step"])] = float(rec["loss"])
    if not steps:
        raise RuntimeError(f"{metrics_file} holds no training losses")
    return [steps[s] for s in sorted(steps)]


def check_settings(*, steps, batch_size, train_frac, lr, warmup_steps, weight_decay, threads, workers,
                   schedule) -> None:
    """Refuse bad run settings before anything is loaded or written: ``TypeError`` / ``ValueError`` naming the
    argument (``batch_size`` >= 2: a contrastive batch needs negatives)."""
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 2), ("warmup_steps", warmup_steps, 0),
                             ("threads", threads, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    for name, value in (("train_frac", train_frac), ("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac must lie in (0, 1), got {train_frac}")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def run_pipeline(images, labels, out, *, classnames: Sequence[str], max_value: Optional[float] = None,
                 model: str = "clip_micro", steps: int = 469, batch_size: int = 64, seed: int = 0,
                 train_frac: float = 0.8, lr: float = 1e-3, warmup_steps: int = 50, schedule: str = "cosine",
                 weight_decay: float = 0.05, threads: int = 1, workers: int = 0, dataset: str = "arrays") -> dict:
    """Write the data set (:func:`write_dataset`) to ``out/data``, train ``model`` on ``train.csv`` into
    ``out/run``, evaluate zero-shot and retrieval on ``test.csv`` and return the summary (also written to
    ``out/summary.json``).  ``out/data`` and ``out/run`` are replaced if they exist."""
    import vlfast.models as M
    from vlfast.training.data import ModelSpec

    check_settings(steps=steps, batch_size=batch_size, train_frac=train_frac, lr=lr, warmup_steps=warmup_steps,
                   weight_decay=weight_decay, threads=threads, workers=workers, schedule=schedule)
    if model not in M.list_models():
        raise ValueError(f"model {model!r} is not registered; available: {', '.join(M.list_models())}")
    spec = ModelSpec(M.create(model))
    if spec.text_len is None:
        raise ValueError(f"model {model!r} takes no text: zero-shot needs an image-text model")
    if spec.image_size[0] != spec.image_size[1]:
        raise ValueError(f"model {model!r} has a non-square image size {spec.image_size}")
    check_captions_fit(classnames, spec.text_len)

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    for d in (data_dir, run_dir):
        if d.exists():
            shutil.rmtree(d)
    t0 = time.perf_counter()
    data = write_dataset(images, labels, data_dir, classnames=classnames, image_size=spec.image_size[0],
                         train_frac=train_frac, seed=seed, max_value=max_value)
    if data.n_train < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {data.n_train} training samples")
    t1 = time.perf_counter()
    train_args = ["train", "--model", model, "--data", f"csv:{data.train_csv}", "--batch-size", str(batch_size),
                  "--steps", str(steps), "--lr", str(lr), "--warmup-steps", str(min(warmup_steps, steps - 1)),
                  "--schedule", schedule, "--weight-decay", str(weight_decay), "--seed", str(seed),
                  "--threads", str(threads), "--workers", str(workers), "--no-progress",
                  "--log-every", str(min(50, steps)), "--out", str(run_dir)]
    _vlfast(train_args, threads=threads, capture=False)
    t2 = time.perf_counter()
    common = ["eval", "--model", model, "--checkpoint", str(run_dir), "--data", f"csv:{data.test_csv}"]
    zs_args = common + ["--task", "zeroshot", "--classnames", str(data.classnames_file), "--prompt", "{}"]
    zs = _last_json(_vlfast(zs_args, threads=threads, capture=True), "vlfast eval --task zeroshot")
    rt_args = common + ["--task", "retrieval"]
    rt = _last_json(_vlfast(rt_args, threads=threads, capture=True), "vlfast eval --task retrieval")
    t3 = time.perf_counter()

    losses = _losses(run_dir / "metrics.jsonl")
    if len(losses) != steps:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} holds {len(losses)} step losses, expected {steps}")
    tail = losses[-min(10, len(losses)):]
    summary = {
        "dataset": dataset, "model": model, "image_size": spec.image_size[0], "context_length": spec.text_len,
        "classnames": list(classnames), "prompt": "{}", "seed": seed, "train_frac": train_frac,
        "train_samples": data.n_train, "test_samples": data.n_test, "classes": len(classnames),
        "steps": steps, "batch_size": batch_size, "epochs": round(steps * batch_size / data.n_train, 2),
        "lr": lr, "warmup_steps": min(warmup_steps, steps - 1), "schedule": schedule, "weight_decay": weight_decay,
        "threads": threads, "workers": workers,
        "loss_first": losses[0], "loss_last": losses[-1], "loss_last10_mean": sum(tail) / len(tail),
        "loss_chance": math.log(batch_size),
        "zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"], "zeroshot_samples": zs["samples"],
        "retrieval_image_to_text_R@1": rt["image_to_text_R@1"], "retrieval_text_to_image_R@1": rt["text_to_image_R@1"],
        "write_s": round(t1 - t0, 2), "train_wall_s": round(t2 - t1, 2), "eval_wall_s": round(t3 - t2, 2),
        "wall_s": round(t3 - t0, 2), "checkpoint": zs["checkpoint"],
        "commands": [shlex.join(["vlfast", *a]) for a in (train_args, zs_args, rt_args)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlfast.bench.digits",
                                description="Train clip_micro on scikit-learn's digits and report zero-shot accuracy.")
    p.add_argument("--out", required=True, help="output folder (its data/ and run/ are replaced)")
    p.add_argument("--steps", type=int, default=469)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the train/test split and the training run")
    p.add_argument("--train-frac", type=float, default=0.8)
    p.add_argument("--classnames", choices=sorted(CLASSNAMES), default="words",
                   help="captions and class names: words (zero..nine) or digits (0..9)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of train and eval")
    p.add_argument("--workers", type=int, default=0, help="decoding workers of vlfast train (0: in process)")
    p.add_argument("--model", default="clip_micro")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    settings = dict(steps=args.steps, batch_size=args.batch_size, train_frac=args.train_frac, lr=args.lr,
                    warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, threads=args.threads,
                    workers=args.workers, schedule=args.schedule)
    try:
        check_settings(**settings)  # before scikit-learn is loaded
        images, labels = load_sklearn_digits()
        summary = run_pipeline(images, labels, args.out, classnames=CLASSNAMES[args.classnames],
                               max_value=SKLEARN_MAX_VALUE, model=args.model, seed=args.seed,
                               dataset="sklearn digits (load_digits)", **settings)
    except (ModuleNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name != "sklearn":
            raise
        print(f"digits: error: {exc}", file=sys.stderr)  # bad input or no scikit-learn: 2; a failed command: 1
        return 1 if isinstance(exc, RuntimeError) else 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
