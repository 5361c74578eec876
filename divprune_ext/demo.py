"""DivPrune on a real photograph: which of 576 ViT-style patch tokens survive.

    python -m divprune_ext.demo                       # scikit-image's astronaut, keep 10%
    python -m divprune_ext.demo photo.jpg --keep-ratio 0.05 --out pruned.png
    python -m divprune_ext.demo builtin:coffee builtin:rocket --out results/

The image is resized to 336x336 and cut into 14x14 patches (24x24 = 576 tokens,
like LLaVA-1.5's CLIP ViT-L/14-336). A token's features are its mean-centred
pixels (588 values), or with --features projection a fixed random projection of
them to 1024 values; no weights are downloaded. DivPrune is compared with three
baselines: random, a uniform grid, and top-k feature norm (a stand-in for
attention-score pruning such as FastV). For each method it prints the MMDP
objective (min pairwise cosine distance among the kept tokens; higher = more
diverse), coverage (mean / max distance from every token to its nearest kept
token; lower = better), and the selection time; and it draws the image with the
pruned patches greyed out.

Needs the demo extras: pip install scikit-image pillow matplotlib
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

import divprune_ext

IMAGE_SIZE = 336
PATCH = 14
BUILTIN_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera")


class DemoError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


def load_image(source: str) -> np.ndarray:
    """RGB uint8 (336, 336, 3) from a file path or ``builtin:NAME`` (scikit-image's sample images)."""
    try:
        from PIL import Image
    except ImportError:
        raise DemoError("the demo needs Pillow: pip install 'divprune_ext[demo]'") from None
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_IMAGES:
            raise DemoError(f"unknown built-in image {name!r}; choose from {', '.join(BUILTIN_IMAGES)}")
        try:
            import skimage.data
        except ImportError:
            raise DemoError("built-in images need scikit-image: pip install 'divprune_ext[demo]'") from None
        image = Image.fromarray(getattr(skimage.data, name)())
    else:
        if not os.path.isfile(source):
            raise DemoError(f"no such image file: {source}")
        try:
            image = Image.open(source)
            image.load()
        except Exception as e:  # PIL raises several types for unreadable files
            raise DemoError(f"cannot read image {source}: {e}") from None
    image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    return np.array(image)  # a writable copy for torch.from_numpy


def patch_features(image: np.ndarray, kind: str = "pixels") -> torch.Tensor:
    """(576, 588) mean-centred patch pixels, or their fixed random projection to 1024 values."""
    grid = IMAGE_SIZE // PATCH
    pixels = torch.from_numpy(image).float().div(255)
    patches = pixels.reshape(grid, PATCH, grid, PATCH, 3).permute(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    features = patches - patches.mean(dim=0)
    if kind == "projection":
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(features.shape[1], 1024, generator=generator) / features.shape[1] ** 0.5
        features = features @ projection
    return features


# Each method maps (features, k) to k kept indices.
def select_divprune(features, k):
    return divprune_ext.select(features, k)


def select_random(features, k):
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(features.shape[0], generator=generator)[:k].to(features.device)


def select_uniform(features, k):
    return torch.linspace(0, features.shape[0] - 1, k, device=features.device).round().long()


def select_feature_norm(features, k):
    return features.norm(dim=-1).topk(k).indices


METHODS = {"DivPrune": select_divprune, "random": select_random, "uniform grid": select_uniform,
           "feature-norm top-k": select_feature_norm}


def diversity_figures(features: torch.Tensor, kept: torch.Tensor) -> dict:
    """MMDP objective and coverage, from the float32 cosine distances."""
    dist = divprune_ext.reference.pairwise_distance(features.cpu())
    kept = kept.cpu()
    among_kept = dist[kept][:, kept].clone()
    among_kept.fill_diagonal_(float("inf"))
    to_nearest_kept = dist[:, kept].min(dim=1).values.clamp_min(0)
    # Rounding can make the distance of identical patches -1e-7; report it as 0.
    return {"min_pairwise_distance": max(0.0, among_kept.min().item()) if len(kept) > 1 else float("nan"),
            "coverage_mean": to_nearest_kept.mean().item(), "coverage_max": to_nearest_kept.max().item()}


def timed_selection(method, features, k, device):
    method(features, k)  # warm-up (lazy init, kernel load)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    kept = method(features, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return kept, (time.perf_counter() - start) * 1e6


def run(image: np.ndarray, keep_ratio: float, device: torch.device, feature_kind: str = "pixels") -> dict:
    """Every method on one image: {method: {"kept": indices, figures..., "time_us": ...}}."""
    features = patch_features(image, feature_kind).to(device)
    k = divprune_ext.keep_count(features.shape[0], keep_ratio)
    results = {}
    for name, method in METHODS.items():
        kept, time_us = timed_selection(method, features, k, device)
        results[name] = {"kept": kept.cpu(), "time_us": time_us, **diversity_figures(features, kept)}
    return results


def grey_out(image: np.ndarray, kept: torch.Tensor) -> np.ndarray:
    grid = IMAGE_SIZE // PATCH
    keep_mask = np.zeros(grid * grid, dtype=bool)
    keep_mask[kept.numpy()] = True
    pixel_mask = np.repeat(np.repeat(keep_mask.reshape(grid, grid), PATCH, 0), PATCH, 1)[..., None]
    faded = (0.2 * image + 0.8 * 200).astype(np.uint8)
    return np.where(pixel_mask, image, faded)


def draw(image: np.ndarray, results: dict, keep_ratio: float, title: str, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DemoError("the demo needs matplotlib: pip install 'divprune_ext[demo]'") from None
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(3.2 * (1 + len(results)), 3.7))
    axes[0].imshow(image)
    axes[0].set_title(f"{title}\n{(IMAGE_SIZE // PATCH) ** 2} tokens", fontsize=9)
    for ax, (name, r) in zip(axes[1:], results.items()):
        ax.imshow(grey_out(image, r["kept"]))
        ax.set_title(f"{name}: {len(r['kept'])} kept ({keep_ratio:.0%})\n"
                     f"min dist {r['min_pairwise_distance']:.3f}, cover {r['coverage_mean']:.3f}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(results: dict) -> str:
    lines = [f"{'method':<20} {'min pairwise dist':>17} {'coverage mean':>13} {'coverage max':>12} {'select us':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<20} {r['min_pairwise_distance']:>17.4f} {r['coverage_mean']:>13.4f} "
                     f"{r['coverage_max']:>12.4f} {r['time_us']:>10.1f}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m divprune_ext.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", default=["builtin:astronaut"],
                   help="image files, or builtin:NAME with NAME in " + ", ".join(BUILTIN_IMAGES))
    p.add_argument("--keep-ratio", type=float, default=0.1, help="fraction of tokens to keep, in (0, 1]")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--features", choices=["pixels", "projection"], default="pixels")
    p.add_argument("--out", default=None, help="output PNG (one image) or folder (several); "
                                               "default divprune_demo.png / divprune_demo/")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not 0.0 < args.keep_ratio <= 1.0:
            raise DemoError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise DemoError(f"unknown --device {args.device!r}; use cpu or cuda") from None
        if device.type == "cuda" and not (torch.cuda.is_available() and divprune_ext.cuda_available()):
            raise DemoError("--device cuda needs a GPU and divprune_ext built with CUDA")
        several = len(args.images) > 1
        out = args.out or ("divprune_demo" if several else "divprune_demo.png")
        for n, source in enumerate(args.images, 1):
            if several:
                print(f"[{n}/{len(args.images)}] {source}", file=sys.stderr)
            image = load_image(source)
            results = run(image, args.keep_ratio, device, args.features)
            stem = os.path.splitext(os.path.basename(source.removeprefix("builtin:")))[0]
            path = os.path.join(out, f"{stem}_divprune.png") if several else out
            draw(image, results, args.keep_ratio, stem, path)
            print(f"\n{source}: keep {args.keep_ratio:g} of 576 tokens on {device}")
            print(format_table(results))
            print(f"wrote {path}")
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
