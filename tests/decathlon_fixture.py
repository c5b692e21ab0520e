"""A tiny tree in the exact official Visual Decathlon format, for all 10 domain names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from unirep.data.classification.decathlon import DECATHLON_DOMAINS, coco_annotation

SIZES = {"train": 8, "val": 4, "test": 4}


def write_official_fixture(root: Path, classes: int = 2, labelled_test: bool = False) -> Path:
    """``root/annotations/<d>_{train,val,test_stripped}.json`` and ``root/data/<d>/<split>/*.jpg``.

    Ids as in the devkit: ``category_id = d·10⁷ + c``, ``image_id = d·10⁷ + 200000 + k`` with k
    consecutive over train, val, test; images 72 px on the shorter side, one colour per class.
    """
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for d, domain in enumerate(DECATHLON_DOMAINS, start=1):
        categories = [
            {"id": d * 10**7 + c, "name": f"{domain}-{c}", "supercategory": domain}
            for c in range(1, classes + 1)
        ]
        k = 0
        for split, count in SIZES.items():
            folder = root / "data" / domain / split
            folder.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for i in range(1, count + 1):
                k += 1
                label = i % classes
                width = 72 + 24 * (d % 3)
                pixels = rng.integers(0, 60, (72, width, 3)).astype(np.uint8)
                pixels[..., label % 3] += 150
                name = f"data/{domain}/{split}/{i:06d}.jpg"
                Image.fromarray(pixels).save(root / name, quality=90)
                image_id = d * 10**7 + 200000 + k
                images.append({"id": image_id, "width": width, "height": 72, "file_name": name})
                annotations.append(coco_annotation(image_id, categories[label]["id"]))
            content = {
                "info": {"year": 2017, "version": 1, "description": "Decathlon"},
                "images": images,
                "categories": categories,
                "licenses": [{"id": 1, "name": "decathlon"}],
            }
            if split == "test":
                (root / "annotations" / f"{domain}_test_stripped.json").write_text(
                    json.dumps(content)
                )
                if labelled_test:
                    content = {**content, "annotations": annotations}
                    (root / "annotations" / f"{domain}_test.json").write_text(json.dumps(content))
            else:
                content = {**content, "annotations": annotations}
                (root / "annotations" / f"{domain}_{split}.json").write_text(json.dumps(content))
    return root
