#!/usr/bin/env python3
"""Build rdrop's embedded demo dataset: scikit-learn's handwritten digits in CIFAR-100 layout.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set: 1,797 real
scanned digits, 8x8 pixels with 17 grey levels (0..16), 10 classes. This script

  * scales the grey levels to 0..255 and upscales each digit to 32x32 with Pillow's bilinear
    resize, replicated to three channels (RGB);
  * makes a seeded stratified split (about 5/6 train, 1/6 test);
  * writes `cifar-100-python.tar.gz` with the same members and pickled dicts as the official
    CIFAR-100 archive: `cifar-100-python/{train,test,meta}`, each a protocol-2 pickle of a dict
    with `filenames`, `batch_label`, `fine_labels`, `coarse_labels`, `data` (N x 3072 uint8,
    the R plane then G then B, 32x32 row-major); `meta` holds `fine_label_names` ("zero".."nine")
    and `coarse_label_names` ("even", "odd": coarse label = digit parity).

The output is committed as rdrop-cli/assets/digits-demo.tar.gz and embedded in the `rdrop`
binary (`rdrop train --preset demo`). Deterministic: the same inputs give the same bytes
(gzip mtime 0, fixed tar metadata).

Usage: python3 scripts/make_demo_dataset.py [OUT]
"""

import gzip
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 42
TEST_FRACTION = 1 / 6
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COARSE = ["even", "odd"]


def to_cifar_rows(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) grey levels 0..16 -> (N, 3072) uint8 rows in CIFAR's CHW order."""
    rows = []
    for img in images8:
        grey = np.round(img * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(grey, mode="L").resize((32, 32), Image.BILINEAR))
        chw = np.stack([big, big, big])  # (3, 32, 32)
        rows.append(chw.reshape(-1))
    return np.stack(rows).astype(np.uint8)


def split_dict(name: str, rows: np.ndarray, labels: np.ndarray, index: np.ndarray) -> dict:
    return {
        "filenames": [f"digit_{int(i):04d}_{NAMES[int(y)]}.png" for i, y in zip(index, labels)],
        "batch_label": f"{name} batch 1 of 1 (scikit-learn digits, rdrop demo)",
        "fine_labels": [int(y) for y in labels],
        "coarse_labels": [int(y) % 2 for y in labels],
        "data": rows,
    }


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = "rdrop"
    tar.addfile(info, io.BytesIO(payload))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("rdrop-cli/assets/digits-demo.tar.gz")
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    index = np.arange(len(labels))
    tr_i, te_i = train_test_split(
        index, test_size=TEST_FRACTION, random_state=SEED, stratify=labels
    )
    tr_i, te_i = np.sort(tr_i), np.sort(te_i)
    rows = to_cifar_rows(images)
    train = split_dict("training", rows[tr_i], labels[tr_i], tr_i)
    test = split_dict("testing", rows[te_i], labels[te_i], te_i)
    meta = {"fine_label_names": NAMES, "coarse_label_names": COARSE}

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, obj in (("meta", meta), ("test", test), ("train", train)):
            add_member(tar, f"cifar-100-python/{name}", pickle.dumps(obj, protocol=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(tar_bytes.getvalue())
    print(
        f"wrote {out}: train {len(tr_i)}, test {len(te_i)}, "
        f"{out.stat().st_size} bytes; train hist {np.bincount(labels[tr_i]).tolist()}"
    )


if __name__ == "__main__":
    main()
