"""A byte-level tokenizer that needs no download (for CLIP, ViLT and ALBEF text inputs).

Each UTF-8 byte maps to one id after a few special tokens:
``[PAD]=0, [CLS]=1, [SEP]=2, [MASK]=3, [UNK]=4``, then bytes ``0..255 -> 5..260``
(vocabulary size 261).  Any other tokenizer works with the models as long as its
ids fit their vocabulary; the models take ``input_ids`` and ``attention_mask``.
"""

from typing import List, Sequence, Tuple, Union

import torch

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
VOCAB_SIZE = NUM_SPECIAL + 256


class ByteTokenizer:
    """``tokenizer(texts, max_length)`` -> ``(input_ids, attention_mask)``, both (B, max_length).

    A sequence is ``[CLS] bytes... [SEP]``, truncated to ``max_length`` (the ``[SEP]``
    kept) and right-padded with ``[PAD]``; ``attention_mask`` is 1 on real tokens, 0 on
    padding (BERT / HF convention).
    """

    pad_token_id, cls_token_id, sep_token_id, mask_token_id, unk_token_id = PAD, CLS, SEP, MASK, UNK
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [CLS] + [NUM_SPECIAL + b for b in text.encode("utf-8")] + [SEP]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - NUM_SPECIAL for i in ids if NUM_SPECIAL <= int(i) < VOCAB_SIZE)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: Union[str, Sequence[str]], max_length: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        ids = torch.full((len(texts), max_length), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            enc = self.encode(t)
            if len(enc) > max_length:
                enc = enc[: max_length - 1] + [SEP]
            ids[i, : len(enc)] = torch.tensor(enc)
        return ids, (ids != PAD).long()
