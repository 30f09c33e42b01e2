"""The overhead augmentation applied in batches on the device against plain references and the PIL
path it replaces."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import TINY_VISION
from PIL import Image

from geobind import GeoBind
from geobind.encoders import ClipVisionEncoder
from geobind.encoders.device_augment import AUG_PARAMS, apply_overhead_augment
from geobind.encoders.images import (
    SATELLITE_MEAN,
    SATELLITE_STD,
    ImageTransform,
    collate_images,
    overhead_augment,
    random_resized_crop,
    resize_center_crop,
)

L, SIZE = 40, 32
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean / std that leave [0, 1] values as they are


def tile(seed: int, px: int = L) -> Image.Image:
    """A smooth seeded RGB tile with some texture (like overhead imagery)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((px, px), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))


def _to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    """The reference normalisation, on the CPU with numpy: ``(pixels / 255 - mean) / std``."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    return (t - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(
        std, dtype=torch.float32)[:, None, None]


def as_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def device_samples(n: int, transform: ImageTransform, seed: int = 0):
    out = []
    for i in range(n):
        random.seed(seed * 1000 + i)
        out.append(transform(tile(i), train=True))
    return out


def reference(pixels: torch.Tensor, aug: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """One tile at a time: sample an unflipped crop on explicitly computed pixel centres, then
    torch.flip / torch.rot90, then PIL's brightness and contrast formulas."""
    out = []
    for px, a in zip(pixels, aug):
        n = px.shape[-1]
        x0, y0, x1, y1, flip, k, bright, contrast = a.tolist()
        img = px.float()[None] / 255
        # Output pixel j samples input pixel coordinate x0*n + (j + 0.5) * width / size - 0.5.
        j = torch.arange(size, dtype=torch.float32)
        xs = x0 * n + (j + 0.5) * (x1 - x0) * n / size - 0.5
        ys = y0 * n + (j + 0.5) * (y1 - y0) * n / size - 0.5
        gx = (2 * xs + 1) / n - 1  # pixel coordinate -> grid_sample's [-1, 1] (align_corners=False)
        gy = (2 * ys + 1) / n - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        x = F.grid_sample(img, grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
        x = x.clamp(0, 1)
        if flip:
            x = torch.flip(x, dims=[-1])
        x = torch.rot90(x, int(k), dims=(-2, -1))
        x = (x * bright).clamp(0, 1)
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
        x = (grey + contrast * (x - grey)).clamp(0, 1)
        m = torch.tensor(mean)[:, None, None]
        s = torch.tensor(std)[:, None, None]
        out.append((x - m) / s)
    return torch.stack(out)


def test_batched_device_augment_equals_per_sample_reference():
    t = ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead", "device", L)
    samples = device_samples(12, t)
    batch = collate_images(samples)
    aug = batch["aug"]
    # The draws cover every flip and quarter turn, and crops other than the full tile.
    assert set(aug[:, 4].tolist()) == {0.0, 1.0} and set(aug[:, 5].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert (aug[:, 2] - aug[:, 0] < 1).any()
    fast = apply_overhead_augment(batch["pixels"], aug, SIZE, SATELLITE_MEAN, SATELLITE_STD)
    slow = reference(batch["pixels"], aug, SIZE, SATELLITE_MEAN, SATELLITE_STD)
    assert fast.shape == (12, 3, SIZE, SIZE) and fast.dtype == torch.float32
    # float32 rounding, magnified about five times by the division by std.
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=0)


def test_identity_parameters_give_nearly_the_pil_evaluation_resize():
    # Not exact: PIL's bicubic (a = -0.5) widens its kernel when shrinking (antialiasing), while
    # grid_sample's bicubic (a = -0.75) samples the 40 px tile at 32 points without it.
    imgs = [tile(i) for i in range(4)]
    pixels = torch.stack([as_uint8(im) for im in imgs])
    aug = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    got = apply_overhead_augment(pixels, aug, SIZE, ZERO, ONE)
    pil = torch.stack([_to_tensor(resize_center_crop(im, SIZE), ZERO, ONE) for im in imgs])
    diff = (got - pil).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.08


def test_device_path_matches_the_pil_loader_path_with_the_same_seed():
    # On a tile already at the load size both modes draw the same crop, flip, turn and factors;
    # the results differ by resampling detail and 8-bit rounding only.
    t = ImageTransform(SIZE, ZERO, ONE, "overhead", "device", L)
    for seed in range(8):
        img = tile(seed)
        random.seed(seed)
        pil = _to_tensor(overhead_augment(random_resized_crop(img, SIZE)), ZERO, ONE)
        random.seed(seed)
        s = t(img, train=True)
        got = apply_overhead_augment(s["pixels"][None], s["aug"][None], SIZE, ZERO, ONE)[0]
        assert (got - pil).abs().mean() < 0.01, seed


def test_flips_and_quarter_turns_of_the_full_tile_are_exact():
    pixels = torch.stack([as_uint8(tile(i, SIZE)) for i in range(2)])
    base = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    plain = apply_overhead_augment(pixels, base.repeat(2, 1), SIZE, ZERO, ONE)
    for flip in (0, 1):
        for k in range(4):
            a = base.clone()
            a[4], a[5] = flip, k
            got = apply_overhead_augment(pixels, a.repeat(2, 1), SIZE, ZERO, ONE)
            want = torch.rot90(torch.flip(plain, [-1]) if flip else plain, k, dims=(-2, -1))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # torch.rot90 turns the way PIL's ROTATE_90 / 180 / 270 do, so k means what the PIL path means.
    img = tile(0, SIZE)
    ops = [Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270]
    for k, op in enumerate(ops, 1):
        assert torch.equal(
            as_uint8(img.transpose(op)), torch.rot90(as_uint8(img), k, dims=(-2, -1))
        )


def test_same_seed_same_parameters_and_uint8_pixels_at_the_load_size():
    t = ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead", "device", L)
    a, b = device_samples(3, t, seed=5), device_samples(3, t, seed=5)
    c = device_samples(3, t, seed=6)
    for x, y in zip(a, b):
        assert torch.equal(x["aug"], y["aug"]) and torch.equal(x["pixels"], y["pixels"])
    assert not all(torch.equal(x["aug"], z["aug"]) for x, z in zip(a, c))
    s = a[0]
    assert s["pixels"].dtype == torch.uint8 and s["pixels"].shape == (3, L, L)
    assert s["aug"].dtype == torch.float32 and s["aug"].shape == (AUG_PARAMS,)
    # A larger tile is resized to the load size; evaluation is the unchanged PIL path.
    random.seed(0)
    assert t(tile(0, 64), train=True)["pixels"].shape == (3, L, L)
    loader = ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead")
    assert torch.equal(t(tile(0), train=False)["pixels"], loader(tile(0), train=False)["pixels"])
    assert ImageTransform(224, SATELLITE_MEAN, SATELLITE_STD, "overhead", "device").load_size == 256


def test_clip_vision_encoder_trains_on_device_batches_and_keeps_the_setting(tmp_path):
    torch.manual_seed(0)
    spec = {"config": TINY_VISION, "augment_on": "device", "load_size": L}
    enc = ClipVisionEncoder.create("satellite", spec, 16, {})
    enc.train()
    samples = device_samples(4, enc.transform)
    batch = enc.collate(samples)
    assert set(batch) == {"pixels", "aug"} and batch["pixels"].shape == (4, 3, L, L)
    emb = enc(batch)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    emb.sum().backward()
    assert enc.model.visual_projection.weight.grad is not None
    # Evaluation batches are normalised tensors, as in loader mode.
    enc.eval()
    assert enc(enc.collate([enc.load(tile(0)), enc.load(tile(1))])).shape == (2, 16)

    GeoBind(16, {"satellite": enc}).save_pretrained(tmp_path / "m")
    settings = json.loads((tmp_path / "m" / "geobind.json").read_text())["modalities"]["satellite"][
        "settings"
    ]
    assert settings["augment_on"] == "device" and settings["load_size"] == L
    loaded = GeoBind.from_pretrained(tmp_path / "m").encoder("satellite")
    assert loaded.transform.augment_on == "device" and loaded.transform.load_size == L

    # Settings written before the option existed load as loader mode.
    old = {k: v for k, v in settings.items() if k not in ("augment_on", "load_size")}
    legacy = ClipVisionEncoder.from_saved("satellite", tmp_path / "m" / "satellite", old, 16, {})
    assert legacy.transform.augment_on == "loader" and "augment_on" not in legacy.settings()
    random.seed(0)
    assert legacy.load(tile(0), train=True)["pixels"].shape == (3, SIZE, SIZE)


def test_unknown_augment_on_is_a_clear_error():
    with pytest.raises(ValueError, match=r"augment_on='gpu'; use one of loader, device"):
        ClipVisionEncoder.create("satellite", {"config": TINY_VISION, "augment_on": "gpu"}, 16, {})
    with pytest.raises(ValueError, match=r"augment_on 'gpu'; use 'loader' or 'device'"):
        ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead", "gpu")


def test_training_with_device_augmentation_resumes_exactly(tiny_data, tmp_path):
    from fixtures import tiny_config
    from safetensors.torch import load_file

    from geobind.binding.trainer import TrainingInterrupted, train
    from geobind.config import parse_config

    def cfg(out):
        d = tiny_config(tiny_data, out, steps=4, audio=False)
        d["stages"][0]["encoder"]["augment_on"] = "device"
        d["stages"][0]["optim"].update(batch_size=12, ckpt_every=100)
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "b"), progress=False, log=None, stop_at_step=2)
    said = []
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, log=said.append)
    assert any("resumed at step 2" in s for s in said), said
    wa = load_file(str(full / "satellite" / "model.safetensors"))
    wb = load_file(str(resumed / "satellite" / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    saved = json.loads((full / "geobind.json").read_text())["modalities"]["satellite"]["settings"]
    assert saved["augment_on"] == "device"


def test_device_evaluation_preprocessing_matches_the_pil_path():
    """``eval_on_device``: the loader hands uint8 ``load_size`` tiles; ``resize_normalize`` gives
    PIL's resize + normalisation up to resampling rounding, exactly when no resize is needed."""
    from geobind.encoders.device_augment import resize_normalize

    t = ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead")
    t.eval_on_device = True
    imgs = [tile(s, px) for s, px in ((0, L), (1, 64), (2, 23))]
    items = [t(img) for img in imgs]
    assert all(x["pixels"].dtype == torch.uint8 and x["pixels"].shape == (3, t.load_size, t.load_size)
               for x in items)
    got = resize_normalize(collate_images(items)["pixels"], SIZE, SATELLITE_MEAN, SATELLITE_STD)
    t.eval_on_device = False
    want = torch.stack([_to_tensor(resize_center_crop(img, SIZE), SATELLITE_MEAN, SATELLITE_STD) for img in imgs])
    std = torch.tensor(SATELLITE_STD)[:, None, None]
    diff = ((got - want) * std).abs()  # in [0, 1] pixel units
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    # A tile already at the model's size is only normalised: exactly the loader's tensor.
    exact = resize_normalize(as_uint8(tile(3, SIZE))[None], SIZE, SATELLITE_MEAN, SATELLITE_STD)
    torch.testing.assert_close(exact[0], _to_tensor(tile(3, SIZE), SATELLITE_MEAN, SATELLITE_STD))


def test_embed_with_preprocessing_on_the_device(tmp_path):
    """``embed_dataset(preprocess_on="device")``: vectors close to the PIL path, recorded in the
    header, the model handed back unchanged; refused for a non-image encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from geobind.search import embed_dataset, read_embeddings

    for i in range(12):
        tile(i, 48).save(tmp_path / f"{i}.png")
    rows = "\n".join(f"t{i},{i},{i},{i}.png" for i in range(12))
    (tmp_path / "tiles.csv").write_text("id,lat,lon,satellite\n" + rows + "\n")
    torch.manual_seed(0)
    enc = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)),
                            ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, "overhead"))
    model = GeoBind(enc.dim, {"satellite": enc}).eval()
    for where in ("loader", "device"):
        embed_dataset(model, tmp_path / "tiles.csv", "satellite", tmp_path / f"{where}.parquet",
                      preprocess_on=where, batch_size=5, log=None)
    a, b = read_embeddings(tmp_path / "loader.parquet"), read_embeddings(tmp_path / "device.parquet")
    assert a.ids == b.ids
    assert (a.vectors * b.vectors).sum(1).min() > 0.99  # cosine of each place's two vectors
    assert b.header.get("preprocess_on") == "device" and "preprocess_on" not in a.header
    assert enc.transform.eval_on_device is False
    with pytest.raises(ValueError, match="image encoder"):
        from geobind.encoders.audio import ClapAudioEncoder, tiny_clap_audio_spec

        audio = ClapAudioEncoder.create("audio", tiny_clap_audio_spec(16), 16, {})
        embed_dataset(GeoBind(16, {"audio": audio}), tmp_path / "tiles.csv", "audio", tmp_path / "x.parquet",
                      preprocess_on="device", log=None)


def test_non_square_tiles_are_cropped_anywhere_as_in_the_loader():
    """A 60 x 40 tile: the device path draws its crop on the whole tile, like the PIL loader
    path with the same seed (a centre square would lose the left and right sixths)."""
    t = ImageTransform(SIZE, ZERO, ONE, "overhead", "device", L)
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (4, 6, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((60, 40), Image.BICUBIC)
    edges = 0
    for seed in range(12):
        random.seed(seed)
        pil = _to_tensor(overhead_augment(random_resized_crop(img, SIZE)), ZERO, ONE)
        random.seed(seed)
        s = t(img, train=True)
        x0, _, x1, _ = s["aug"][:4].tolist()
        edges += x0 < 1 / 6 or x1 > 5 / 6
        assert s["pixels"].shape == (3, L, L)
        got = apply_overhead_augment(s["pixels"][None], s["aug"][None], SIZE, ZERO, ONE)[0]
        assert (got - pil).abs().mean() < 0.02, seed
    assert edges >= 3  # some crops reach into the strips a centre square would drop


@pytest.mark.parametrize("augment", ["overhead", "none"])
def test_loader_items_travel_as_uint8_and_normalise_to_the_same_floats(augment):
    """Training and evaluation items leave the loader as uint8 (a quarter of float32's bytes to
    pin and copy) and the encoder normalises them where it runs: bit for bit the float tensors
    the loader used to make, with the same random draws."""
    from geobind.encoders.device_augment import model_input

    t = ImageTransform(SIZE, SATELLITE_MEAN, SATELLITE_STD, augment)
    items, ref = [], []
    for i in range(4):
        img = tile(i)
        random.seed(i)
        items.append(t(img, train=True))
        random.seed(i)
        pil = overhead_augment(random_resized_crop(img, SIZE)) if augment == "overhead" else resize_center_crop(img, SIZE)
        ref.append(_to_tensor(pil, SATELLITE_MEAN, SATELLITE_STD))
    batch = collate_images(items)
    assert set(batch) == {"pixels"} and batch["pixels"].dtype == torch.uint8
    assert batch["pixels"].shape == (4, 3, SIZE, SIZE)
    assert torch.equal(model_input(batch, t, torch.device("cpu")), torch.stack(ref))
    # Evaluation items too: uint8 at the model's size, normalised to the reference floats.
    ev = collate_images([t(tile(i), train=False) for i in range(3)])
    want = torch.stack([_to_tensor(resize_center_crop(tile(i), SIZE), SATELLITE_MEAN, SATELLITE_STD) for i in range(3)])
    assert ev["pixels"].dtype == torch.uint8 and torch.equal(model_input(ev, t, torch.device("cpu")), want)
