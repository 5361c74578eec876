"""The demo end to end on the built-in images, and DivPrune's diversity claim."""
import pytest
import torch

pytest.importorskip("skimage", reason="demo extra: pip install scikit-image")
pytest.importorskip("matplotlib", reason="demo extra: pip install matplotlib")
from divprune_ext import demo  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_a_png(tmp_path, capsys):
    out = tmp_path / "astronaut.png"
    assert demo.main(["--out", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    from PIL import Image
    with Image.open(out) as image:
        assert image.size[0] > 4 * image.size[1]  # original + four methods side by side
    printed = capsys.readouterr().out
    for method in demo.METHODS:
        assert method in printed


def test_demo_batch_of_images(tmp_path):
    assert demo.main(["builtin:coffee", "builtin:camera", "--out", str(tmp_path), "--features", "projection"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camera_divprune.png", "coffee_divprune.png"]


@pytest.mark.parametrize("image", demo.BUILTIN_IMAGES)
@pytest.mark.parametrize("keep_ratio", [0.05, 0.1, 0.25])
def test_divprune_is_the_most_diverse(image, keep_ratio):
    # The paper's claim: DivPrune's kept set has the largest min pairwise distance.
    results = demo.run(demo.load_image(f"builtin:{image}"), keep_ratio, torch.device("cpu"))
    ours = results["DivPrune"]["min_pairwise_distance"]
    for name, r in results.items():
        assert len(r["kept"]) == round(576 * keep_ratio)
        assert ours >= r["min_pairwise_distance"], f"{name} beats DivPrune on {image}"


def test_patch_grid_matches_llava():
    features = demo.patch_features(demo.load_image("builtin:chelsea"))
    assert features.shape == (576, 14 * 14 * 3)


@pytest.mark.parametrize("argv,message", [
    (["/no/such/image.png"], "no such image file: /no/such/image.png"),
    (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1], got 0.0"),
    (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1], got 1.5"),
    (["builtin:nothing"], "unknown built-in image 'nothing'"),
    (["--device", "tpu9"], "unknown --device 'tpu9'"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    assert demo.main([str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
