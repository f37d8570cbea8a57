"""How much class signal does a *frozen* VLM encoder get from the demo's generated data?

    python benchmarks/data_signal.py                 # both styles x random / pretrained tiny, 3 data seeds

The paper's premise: the VLM's pretrained vision encoder carries generic features that tell the
task's classes apart only partly; the task-specific model (TSM) learns the rest. This prints, per
generated data style (``medmnist_npz`` ``grating`` and ``shapes``) and per frozen encoder (the tiny
InternVL2 with random weights, and the same model pretrained by ``make-tiny --pretrain``), the test
macro-F1 of a linear probe (scikit-learn logistic regression) on the frozen image tokens the LLM
receives (ViT + pixel shuffle + mlp1), and of the same probe on the raw pixels. Chance is ~0.2.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def frozen_tokens(model_dir, images):
    """(N, tokens x hidden) image tokens of the frozen VLM for uint8 images (N, H, W[, 3])."""
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from transformers import AutoModel

    from xtuner_vitask.datasets.internvl import InternVL2Dataset

    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, torch_dtype=torch.float32).eval()
    size = model.config.force_image_size
    transform = T.Compose([  # the training transform of InternVL2Dataset: RGB, bicubic resize, ImageNet norm
        T.Lambda(lambda img: img.convert("RGB")), T.Resize((size, size), T.InterpolationMode.BICUBIC), T.ToTensor(),
        T.Normalize(InternVL2Dataset.IMAGENET_MEAN, InternVL2Dataset.IMAGENET_STD)])
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 64):
            batch = torch.stack([transform(Image.fromarray(im)) for im in images[start:start + 64]])
            out.append(model.extract_feature(batch).flatten(1))
    return torch.cat(out).numpy()


def probe_f1(train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    probe.fit(train_x, train_y)
    return f1_score(test_y, probe.predict(test_x), average="macro")


def main(argv=None):
    import numpy as np

    from xtuner_vitask import demo
    from xtuner_vitask.testing.medmnist_npz import write_medmnist_npz

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="work_dirs/data_signal")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--flag", default=demo.FULL.flag)
    parser.add_argument("--n", type=int, nargs=3, default=list(demo.FULL.n_per_split), help="train val test")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    started = time.perf_counter()
    encoders = {"random": demo.build_vlm(out / "random", pretrained=False),
                "pretrained": demo.build_vlm(out / "pretrained", pretrained=True)}
    rows = {}
    for style in ("grating", "shapes"):
        for seed in range(args.seeds):
            npz = np.load(write_medmnist_npz(out / f"{style}{seed}.npz", args.flag, tuple(args.n), seed=seed,
                                             style=style))
            train_y, test_y = npz["train_labels"][:, 0], npz["test_labels"][:, 0]
            pixels = {s: npz[f"{s}_images"].reshape(len(npz[f"{s}_images"]), -1) / 255.0 for s in ("train", "test")}
            rows.setdefault((style, "pixels"), []).append(probe_f1(pixels["train"], train_y, pixels["test"], test_y))
            for name, model_dir in encoders.items():
                feats = {s: frozen_tokens(model_dir, npz[f"{s}_images"]) for s in ("train", "test")}
                rows.setdefault((style, name), []).append(probe_f1(feats["train"], train_y, feats["test"], test_y))
    print(f"\nlinear probe, test macro-F1 (generated {args.flag}, {args.n} images, {args.seeds} data seeds, mean ± std)\n")
    print("| data style | raw pixels | frozen tiny VLM, random | frozen tiny VLM, pretrained |\n|---|---:|---:|---:|")
    for style in ("grating", "shapes"):
        cells = [rows[(style, k)] for k in ("pixels", "random", "pretrained")]
        print(f"| {style} | " + " | ".join(f"{statistics.mean(c):.3f} ± {statistics.stdev(c) if len(c) > 1 else 0:.3f}"
                                          for c in cells) + " |")
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
