"""``vlfast eval``: zero-shot classification, image-text retrieval and kNN on a trained checkpoint.

::

    vlfast eval --model clip_micro --checkpoint runs/train --data csv:test.csv --task zeroshot \\
        --classnames classes.txt [--prompt "a photo of a {}."]
    vlfast eval --model clip_micro --checkpoint runs/train/checkpoints/step_200 --data wds:val-{000..003}.tar \\
        --task retrieval
    vlfast eval --model moco_v3_micro --checkpoint runs/moco --data csv:test.csv --knn-train csv:train.csv --task knn

``--checkpoint`` is a run folder, its ``checkpoints`` folder, the ``latest`` pointer file or one
``step_N`` folder; the weights are its ``model.pt`` (``--ema``: ``ema.pt``), read with
``weights_only=True`` (:func:`vlfast.training.checkpoint.load_file`).  The metrics are printed as
one JSON object on the last line of stdout; bad input gives one ``vlfast eval: error: ...`` line and
exit status 2.

Tasks (features are L2-normalized; similarities are cosines):

* ``zeroshot`` (Radford et al., 2021, arXiv:2103.00020): class ``c``'s text is ``prompt.format(name_c)``
  (``--classnames``: one name per line, in label order); an image's prediction ranks the classes
  by ``<image, text_c>``; top-1 / top-5 accuracy against the data's ``label`` column.
* ``retrieval``: sample ``i``'s caption is the match of image ``i``; image->text and text->image
  recall@1/5/10 (the fraction of queries whose match ranks in the top k).
* ``knn`` (Wu et al., 2018, arXiv:1805.01978, as DINO's ``eval_knn.py``): the ``k`` nearest
  ``--knn-train`` features vote for their labels with weight ``exp(sim / T)`` (``--knn-k`` 20,
  ``--knn-temperature`` 0.07); top-1 / top-5 accuracy on ``--data``.

The embeddings a model offers (:func:`image_text_encoders`, :func:`image_features`):
``encode_image``/``encode_text`` (CLIP, CoCa), ALBEF/BLIP's ITC space (``vision_proj`` of the
visual encoder's class token, ``text_proj`` of the text encoder's), and for kNN the representation
the self-supervised papers evaluate: ``encode_image``, ``encode`` (SimCLR, DINO), MAE's encoder
without masking (class token), MoCo's base encoder (class token), a ViT's class token.
"""

import argparse
import inspect
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data import CsvData, DataError, WdsData, load_image, parse_data_spec

PROG = "vlfast eval"
TASKS = ("zeroshot", "retrieval", "knn")


class EvalError(Exception):
    """A user-facing error: printed as one ``vlfast eval: error: ...`` line."""


# --------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str) -> "ckpt.StepFolder":
    """The step folder named by ``path`` (run folder, ``checkpoints`` folder, ``latest`` file, step folder;
    :meth:`vlfast.training.checkpoint.CheckpointManager.resolve`)."""
    try:
        return ckpt.CheckpointManager.resolve(path)
    except ckpt.CheckpointError as exc:
        raise EvalError(f"--checkpoint {exc}") from None


def load_model(name: str, checkpoint: str, *, ema: bool = False, fused: bool = True, device=None):
    """``vlfast.models.create(name)`` with the weights of ``checkpoint`` (see :func:`resolve_checkpoint`)."""
    import vlfast.models as M

    if name not in M.list_models():
        raise EvalError(f"unknown model {name!r}; available: {', '.join(M.list_models())}")
    step = resolve_checkpoint(checkpoint)
    file = step.ema if ema else step.model
    if not os.path.isfile(file):
        raise EvalError(f"{file} does not exist" + (" (was the run trained with --ema?)" if ema else ""))
    state = ckpt.load_file(file)
    if ema:  # EMA state dicts name the averaged model "module" (timm's ModelEmaV3)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    model = M.create(name, fused=fused)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EvalError(f"{file} does not hold {name!r} weights: {str(exc).splitlines()[0]}") from None
    return model.to(device or "cpu").eval(), step.path


# --------------------------------------------------------------------------- embeddings
def image_text_encoders(model) -> Tuple[Callable, Callable]:
    """``(images -> (B, D), (input_ids, attention_mask) -> (B, D))``: L2-normalized features of one shared space."""
    if callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None)):
        takes_mask = "attention_mask" in inspect.signature(model.encode_text).parameters

        def txt(ids, mask):
            out = model.encode_text(ids, attention_mask=mask) if takes_mask else model.encode_text(ids)
            return F.normalize(out.float(), dim=-1)

        return (lambda x: F.normalize(model.encode_image(x).float(), dim=-1)), txt
    if all(hasattr(model, a) for a in ("visual_encoder", "vision_proj", "text_encoder", "text_proj")):  # ALBEF, BLIP
        def img(x):
            return F.normalize(model.vision_proj(model.visual_encoder.forward_features(x)[:, 0]).float(), dim=-1)

        def txt(ids, mask):
            emb = model.text_encoder.encode_text(ids, mask == 0)
            return F.normalize(model.text_proj(emb[:, 0]).float(), dim=-1)

        return img, txt
    raise EvalError(f"model {type(model).__name__} has no image-text embedding space (zeroshot and retrieval need "
                    "encode_image/encode_text, as CLIP and CoCa, or ALBEF/BLIP's vision_proj/text_proj)")


def image_features(model) -> Callable:
    """``images -> (B, D)`` L2-normalized features for kNN (see the module docstring for the order tried)."""
    if callable(getattr(model, "encode_image", None)):
        f = model.encode_image
    elif callable(getattr(model, "encode", None)):
        f = model.encode
    elif callable(getattr(model, "forward_encoder", None)):  # MAE: every patch kept, the class token
        def f(x):
            return model.forward_encoder(x, mask_ratio=0.0)[0][:, 0]
    elif callable(getattr(getattr(model, "base_encoder", None), "forward_features", None)):  # MoCo v3
        def f(x):
            return model.base_encoder.forward_features(x)[:, 0]
    elif callable(getattr(model, "forward_features", None)):
        def f(x):
            return model.forward_features(x)[:, 0]
    else:
        raise EvalError(f"model {type(model).__name__} offers no image features for kNN")
    return lambda x: F.normalize(f(x).float(), dim=-1)


# --------------------------------------------------------------------------- data
def _open_data(spec: str, model, *, need_captions: bool, need_labels: bool):
    kind, arg = parse_data_spec(spec)
    if kind == "synthetic":
        raise EvalError(f"evaluation needs real data (csv:PATH or wds:PATTERN), got {spec!r}")
    cls = CsvData if kind == "csv" else WdsData
    data = cls(arg, model, 1, warn=_warn, require_captions=need_captions)
    if need_labels and not data.labeled:
        raise EvalError(f"{spec}: every sample needs a label ('label' column / .cls member) for this task")
    return data


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def _batches(data, batch_size: int, device):
    """``(images (b, C, H, W), sample indices)`` over every readable sample in order (unreadable ones skipped)."""
    size, chans = data.spec.image_size, data.spec.in_chans
    imgs, idx = [], []
    for i in range(data.num_samples):
        try:
            imgs.append(load_image(data._image(i), size, chans))
        except Exception as exc:  # corrupt / missing image: skip and count, never fatal
            _warn(f"skipping unreadable image {data._describe(i)}: {type(exc).__name__}: {exc}")
            data.bad.add(i)
            continue
        idx.append(i)
        if len(imgs) == batch_size:
            yield torch.stack(imgs).to(device), idx
            imgs, idx = [], []
    if imgs:
        yield torch.stack(imgs).to(device), idx


def _tokenize(data, texts: List[str], device):
    if data.spec.text_len is None:
        raise EvalError("this model takes no text")
    from vlfast.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cut = sum(len(tok.encode(t)) > data.spec.text_len for t in texts)
    if cut:
        _warn(f"{cut} of {len(texts)} texts are longer than the model's context of {data.spec.text_len} tokens "
              "and are cut")
    ids, mask = tok(texts, data.spec.text_len)
    return ids.to(device), mask.to(device)


def _encode_images(data, fn, batch_size, device):
    feats, rows = [], []
    for x, idx in _batches(data, batch_size, device):
        feats.append(fn(x))
        rows.extend(idx)
    if not rows:
        raise EvalError("no readable image in the data")
    return torch.cat(feats), rows


def _encode_texts(data, fn, texts, batch_size, device):
    ids, mask = _tokenize(data, texts, device)
    return torch.cat([fn(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    order = scores.argsort(dim=1, descending=True)
    hit = order == labels[:, None]
    return {f"top{k}": float(hit[:, :min(k, scores.shape[1])].any(1).float().mean()) for k in ks}


def _recall(sim: torch.Tensor, ks=(1, 5, 10)) -> Dict[int, float]:
    """Query ``i``'s match is item ``i``: fraction of queries whose match is among the top ``k``."""
    target = sim.diagonal()[:, None]
    rank = (sim > target).sum(1)  # items scoring strictly above the match
    return {k: float((rank < k).float().mean()) for k in ks}


# --------------------------------------------------------------------------- tasks
@torch.no_grad()
def zeroshot(model, data, classnames: List[str], prompt: str, batch_size: int, device) -> Dict[str, float]:
    img_fn, txt_fn = image_text_encoders(model)
    class_feats = _encode_texts(data, txt_fn, [prompt.format(c) for c in classnames], batch_size, device)
    feats, rows = _encode_images(data, img_fn, batch_size, device)
    labels = torch.tensor([data.samples[i][2] for i in rows], device=feats.device)
    if int(labels.min()) < 0 or int(labels.max()) >= len(classnames):
        raise EvalError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but --classnames has "
                        f"{len(classnames)} names")
    out = _topk_accuracy(feats @ class_feats.T, labels)
    return {"top1": out["top1"], "top5": out["top5"], "samples": len(rows), "classes": len(classnames)}


@torch.no_grad()
def retrieval(model, data, batch_size: int, device) -> Dict[str, float]:
    img_fn, txt_fn = image_text_encoders(model)
    feats, rows = _encode_images(data, img_fn, batch_size, device)
    texts = _encode_texts(data, txt_fn, [data.samples[i][1] for i in rows], batch_size, device)
    sim = feats @ texts.T
    i2t, t2i = _recall(sim), _recall(sim.T)
    out = {f"image_to_text_R@{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image_R@{k}": v for k, v in t2i.items()})
    out["samples"] = len(rows)
    return out


@torch.no_grad()
def knn(model, data, train, k: int, temperature: float, batch_size: int, device) -> Dict[str, float]:
    fn = image_features(model)
    bank, bank_rows = _encode_images(train, fn, batch_size, device)
    bank_labels = torch.tensor([train.samples[i][2] for i in bank_rows], device=bank.device)
    feats, rows = _encode_images(data, fn, batch_size, device)
    labels = torch.tensor([data.samples[i][2] for i in rows], device=feats.device)
    n_cls = int(max(int(bank_labels.max()), int(labels.max()))) + 1
    kk = min(k, bank.shape[0])
    scores = []
    for i in range(0, feats.shape[0], batch_size):
        sim, nn_idx = (feats[i:i + batch_size] @ bank.T).topk(kk, dim=1)
        votes = torch.zeros(sim.shape[0], n_cls, device=feats.device)
        votes.scatter_add_(1, bank_labels[nn_idx], (sim / temperature).exp())
        scores.append(votes)
    out = _topk_accuracy(torch.cat(scores), labels)
    return {"top1": out["top1"], "top5": out["top5"], "samples": len(rows), "train_samples": len(bank_rows), "k": kk}


# --------------------------------------------------------------------------- command line
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a vlfast checkpoint: zero-shot, retrieval or kNN.")
    p.add_argument("--model", required=True, help="model name (see vlfast.models.list_models())")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="run folder, its checkpoints folder, the 'latest' file or a step folder")
    p.add_argument("--data", required=True, help="csv:PATH | wds:PATTERN (the evaluation set)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--classnames", metavar="FILE", help="zeroshot: class names, one per line, in label order")
    p.add_argument("--prompt", default="a photo of a {}.", help="zeroshot: the text of a class ('{}': its name)")
    p.add_argument("--knn-train", metavar="SPEC", help="knn: the memory bank's data (csv:PATH | wds:PATTERN)")
    p.add_argument("--knn-k", type=_positive_int, default=20)
    p.add_argument("--knn-temperature", type=_positive_float, default=0.07)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights (ema.pt)")
    p.add_argument("--eager", action="store_true", help="build the model with fused=False")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    return p


def read_classnames(path: Optional[str]) -> List[str]:
    if path is None:
        raise EvalError("--task zeroshot needs --classnames FILE (one class name per line, in label order)")
    try:
        with open(path, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    except OSError as exc:
        raise EvalError(f"cannot read --classnames {path!r}: {exc.strerror or exc}") from None
    if not names:
        raise EvalError(f"--classnames {path!r} has no names")
    return names


def check_prompt(prompt: str) -> None:
    if "{}" not in prompt:
        raise EvalError(f"--prompt {prompt!r} has no '{{}}' for the class name")


def run(args) -> Dict[str, object]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classnames = None
    if args.task == "zeroshot":
        classnames = read_classnames(args.classnames)
        check_prompt(args.prompt)
    if args.task == "knn" and args.knn_train is None:
        raise EvalError("--task knn needs --knn-train SPEC (the labelled memory bank)")
    model, step = load_model(args.model, args.checkpoint, ema=args.ema, fused=not args.eager, device=device)
    task = Evaluation(model, args.task, args.data, classnames=classnames if args.task == "zeroshot" else None,
                      prompt=args.prompt, knn_train=args.knn_train, knn_k=args.knn_k,
                      knn_temperature=args.knn_temperature, batch_size=args.batch_size)
    return {"task": args.task, "model": args.model, "checkpoint": step, **task(model, device)}


class Evaluation:
    """One task on one data set, opened once and run on a model whenever called (``vlfast train
    --eval-every``): ``Evaluation(model, task, data_spec, ...)(model, device) -> metrics``.  The model
    is put in ``eval()`` mode for the call and back into its previous mode after."""

    def __init__(self, model, task: str, data: str, *, classnames: Optional[List[str]] = None,
                 prompt: str = "a photo of a {}.", knn_train: Optional[str] = None, knn_k: int = 20,
                 knn_temperature: float = 0.07, batch_size: int = 64):
        if task not in TASKS:
            raise EvalError(f"task must be one of {TASKS}, got {task!r}")
        if task == "zeroshot" and not classnames:
            raise EvalError("--task zeroshot needs --classnames FILE (one class name per line, in label order)")
        if task == "knn" and knn_train is None:
            raise EvalError("--task knn needs --knn-train SPEC (the labelled memory bank)")
        if task in ("zeroshot", "retrieval"):
            image_text_encoders(model)  # refuse a model without the embedding space now, not mid-run
        else:
            image_features(model)
        self.task, self.classnames, self.prompt = task, classnames, prompt
        self.k, self.temperature, self.batch_size = knn_k, knn_temperature, batch_size
        self.data = _open_data(data, model, need_captions=task == "retrieval", need_labels=task != "retrieval")
        self.train = _open_data(knn_train, model, need_captions=False, need_labels=True) if task == "knn" else None

    def __call__(self, model, device) -> Dict[str, object]:
        was_training = model.training
        model.eval()
        try:
            if self.task == "zeroshot":
                out = zeroshot(model, self.data, self.classnames, self.prompt, self.batch_size, device)
            elif self.task == "retrieval":
                out = retrieval(model, self.data, self.batch_size, device)
            else:
                out = knn(model, self.data, self.train, self.k, self.temperature, self.batch_size, device)
        finally:
            model.train(was_training)
        out["skipped_images"] = len(self.data.bad)
        return {"task": self.task, **out}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (EvalError, DataError, ckpt.CheckpointError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
