"""Image loading edge cases, preprocessing, and the real pretrained encoder on real photos."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.data.images import ImageError, load_image, preprocess
from captioner.features.encoder import ENCODERS, ONNX_ATOL, Encoder, encoder_top, get_spec, pretrained_net

# Flickr8k photos whose five captions all say "dog"
DOGS = ["1001773457_577c3a7d70.jpg", "1003163366_44323f5815.jpg", "1015584366_dfcec3c85a.jpg"]


@pytest.fixture(scope="module")
def dog_paths(flickr8k_root):
    paths = [flickr8k_root / "images" / d for d in DOGS]
    assert all(p.is_file() for p in paths)
    return paths


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _save(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# --- bad and unusual images -----------------------------------------------------------------

def _assert_one_line_error(src, name, reason, **kw):
    with pytest.raises(ImageError) as e:
        load_image(src, name=name, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{name}: ") and reason in msg


def test_truncated_zero_byte_and_text_files_are_refused(tmp_path, dog_paths):
    jpeg = dog_paths[0].read_bytes()
    _assert_one_line_error(_save(tmp_path, "cut.jpg", jpeg[: len(jpeg) // 2]), "cut.jpg", "truncated")
    _assert_one_line_error(_save(tmp_path, "zero.jpg", b""), "zero.jpg", "empty")
    _assert_one_line_error(b"", "upload", "empty")
    _assert_one_line_error(_save(tmp_path, "text.jpg", b"hello, I am not a JPEG\n" * 20), "text.jpg", "not an image")
    _assert_one_line_error(tmp_path / "nowhere.jpg", "nowhere.jpg", "not found")
    # the name defaults to the path
    with pytest.raises(ImageError, match=r"zero\.jpg: empty"):
        load_image(tmp_path / "zero.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # a real PNG whose header claims 100000 x 100000 pixels: only the header may be read
    png = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = png[12:29]
    ihdr[4:12] = struct.pack(">II", 100_000, 100_000)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    _assert_one_line_error(_save(tmp_path, "bomb.png", bytes(png)), "bomb.png", "pixels")
    # the limit is per call, no global setting involved
    small = _save(tmp_path, "small.png", _png_bytes(Image.new("RGB", (20, 20))))
    _assert_one_line_error(small, "small.png", "over the 100 limit", max_pixels=100)
    assert load_image(small).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # untouched


def test_cmyk_palette_grayscale_are_converted_with_their_colours(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    img = load_image(buf.getvalue(), "cmyk.jpg")
    assert img.mode == "RGB"
    r, g, b = np.asarray(img)[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60

    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(1, (0, 0, 8, 8))
    assert tuple(np.asarray(load_image(_png_bytes(pal)))[0, 0]) == (10, 200, 30)

    grey = load_image(_png_bytes(Image.new("L", (5, 5), 77)))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[2, 2]) == (77, 77, 77)


def test_sixteen_bit_greyscale_keeps_its_brightness():
    arr = np.full((6, 6), 32768, np.uint16)  # mid grey at 16 bits
    png = _png_bytes(Image.fromarray(arr))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    px = np.asarray(load_image(png))[3, 3]
    assert abs(int(px[0]) - 128) <= 1 and px[0] == px[1] == px[2]  # not clipped to white


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = np.asarray(load_image(_png_bytes(rgba))).astype(int)
    assert tuple(out[3, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert all(abs(v - 127) <= 2 for v in out[0, 1])  # half black over white

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    transparent_palette = load_image(_png_bytes(pal, transparency=1))
    assert tuple(np.asarray(transparent_palette)[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    img.paste((0, 0, 255), (10, 0, 20, 10))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue(), "rotated.jpg")
    assert out.size == (10, 20)
    arr = np.asarray(out).astype(int)
    assert arr[2, 5, 0] > 200 and arr[2, 5, 2] < 60    # top is the old left: red
    assert arr[17, 5, 2] > 200 and arr[17, 5, 0] < 60  # bottom is the old right: blue


def test_gif_first_frame_and_one_pixel_images():
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(load_image(buf.getvalue()))[0, 0].astype(int)
    assert px[0] > 200 and px[2] < 60

    tiny = load_image(Image.new("RGB", (1, 1), (1, 2, 3)))
    x = preprocess(tiny, get_spec("lite0"))
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()


def test_preprocess_normalises_like_the_tf_lite_models():
    spec = get_spec("lite2")
    white = preprocess(Image.new("RGB", (30, 40), (255, 255, 255)), spec)
    black = preprocess(Image.new("RGB", (30, 40), (0, 0, 0)), spec)
    assert white.shape == (3, 260, 260) and white.dtype == np.float32
    assert np.allclose(white, 1.0) and np.allclose(black, -127 / 128)


def test_unknown_encoder_and_wrong_batch_shape():
    for bad in ("resnet", "lite3", "lite2-cut", "lite2+", "lite2-flip"):
        with pytest.raises(ValueError, match="lite0, lite1, lite2"):
            get_spec(bad)
    with pytest.raises(ValueError, match="cut 1..5"):
        get_spec("lite2-cut6")
    with pytest.raises(ValueError, match="cannot be concatenated"):
        get_spec("lite0-cut1+lite2")
    with pytest.raises(ValueError, match="backend"):
        Encoder.load("lite0", backend="tpu")
    enc = Encoder.load("lite0", backend="torch")
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        enc.encode(np.zeros((1, 3, 260, 260), np.float32))


# --- the real network ------------------------------------------------------------------------

@pytest.mark.slow
def test_pretrained_classifier_sees_dogs(dog_paths):
    import torch
    spec = get_spec("lite2")
    net = pretrained_net("lite2")  # the full classifier, head included
    x = torch.from_numpy(np.stack([preprocess(load_image(p), spec) for p in dog_paths]))
    with torch.inference_mode():
        top5 = net(x).topk(5).indices
    is_dog = (top5 >= 151) & (top5 <= 268)  # ImageNet dog breeds
    assert is_dog.any(dim=1).all(), top5.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENCODERS))
def test_grid_shapes_match_the_registry(name, dog_paths):
    enc = Encoder.load(name, backend="torch")
    feats = enc.encode_images(dog_paths[:1])
    spec = ENCODERS[name]
    assert feats.shape == (1, spec.num_regions, spec.channels) and feats.dtype == np.float32
    assert 0 <= feats.min() and feats.max() <= 6 and feats.std() > 0.05  # ReLU6 outputs, not a constant


@pytest.mark.slow
def test_onnx_agrees_with_torch_and_regions_are_row_major(dog_paths):
    import torch
    onnx = Encoder.load("lite2", backend="onnx")
    torch_enc = Encoder.load("lite2", backend="torch")
    assert (onnx.backend, torch_enc.backend) == ("onnx", "torch")
    a, b = onnx.encode_images(dog_paths), torch_enc.encode_images(dog_paths)
    assert a.shape == (3, 81, 1280)
    assert np.abs(a - b).max() <= ONNX_ATOL
    # region r is grid cell (r // 9, r % 9) of the conv map
    x = torch.from_numpy(np.stack([preprocess(load_image(p), onnx.spec) for p in dog_paths[:1]]))
    with torch.inference_mode():
        grid = pretrained_net("lite2").extract_features(x).numpy()[0]  # (C, 9, 9)
    assert np.allclose(b[0, 2 * 9 + 5], grid[:, 2, 5], atol=1e-5)
    assert Encoder.load("lite2").backend == "onnx"  # auto picks onnxruntime when installed


def test_composite_and_cut_specs():
    both = get_spec("lite0+lite2")  # lite0 runs at lite2's input so the grids line up
    assert (both.input_size, both.grid, both.channels) == (260, (9, 9), 2560)
    assert (get_spec("lite1+lite0").input_size, get_spec("lite1+lite0").grid) == (240, (8, 8))
    cut = get_spec("lite2-cut2")
    assert (cut.input_size, cut.grid, cut.channels) == (260, (9, 9), 208)
    big = get_spec("lite2@320")  # a larger input: a finer grid of the same channels
    assert (big.input_size, big.grid, big.channels) == (320, (10, 10), 1280)
    assert get_spec("lite2-cut2@384").grid == (12, 12) and get_spec("lite0+lite2@288").grid == (9, 9)
    for bad in ("lite2@", "lite2@big", "lite2@32", "lite9@320"):
        with pytest.raises(ValueError, match="encoder"):
            get_spec(bad)


def test_a_larger_input_gives_the_network_s_finer_grid(dog_paths):
    """lite2@320 is the same network laid out for 320 pixels: its 10x10 grid is what the network computes there."""
    import torch
    spec = get_spec("lite2@320")
    x = np.stack([preprocess(load_image(p), spec) for p in dog_paths[:1]])
    assert x.shape == (1, 3, 320, 320)
    grid = Encoder.load(spec.name, backend="torch").encode(x)
    with torch.inference_mode():
        want = pretrained_net("lite2", 320).extract_features(torch.from_numpy(x)).flatten(2).transpose(1, 2).numpy()
    assert grid.shape == (1, 100, 1280) and np.allclose(grid, want, atol=1e-5)


@pytest.mark.slow
def test_concatenated_and_cut_grids_are_the_parts(dog_paths):
    """lite0+lite2 is [lite0 at 260 | lite2] by channel; lite2-cutK + its top = lite2, exactly."""
    import torch
    x = np.stack([preprocess(load_image(p), get_spec("lite2")) for p in dog_paths[:2]])
    both = Encoder.load("lite0+lite2", backend="torch").encode(x)
    lite2 = Encoder.load("lite2", backend="torch").encode(x)
    with torch.inference_mode():
        lite0 = pretrained_net("lite0", 260).extract_features(torch.from_numpy(x)).flatten(2).transpose(1, 2)
    assert both.shape == (2, 81, 2560)
    assert np.allclose(both[..., 1280:], lite2, atol=1e-5) and np.allclose(both[..., :1280], lite0, atol=1e-5)
    spec = get_spec("lite2-cut2")
    low = Encoder.load(spec.name, backend="torch").encode(x)
    assert low.shape == (2, 81, 208)
    top = encoder_top(spec).train()  # stays in eval mode: BatchNorm keeps the ImageNet statistics
    assert not top.training
    with torch.no_grad():
        assert np.allclose(top(torch.from_numpy(low)).numpy(), lite2, atol=1e-4)


def test_int8_encoder_is_close_to_float_and_batch_independent(dog_paths):
    """The shipped static-int8 graph (tools/quantize_encoder.py): fixed activation ranges, so a photo's grid is
    the same alone and in a batch; close to the float grid (its scores: benchmarks/int8_encoder.py)."""
    from captioner.apps.api import Captioner
    from captioner.features.encoder import int8_path
    spec = get_spec("lite2")
    assert int8_path(spec) is not None, "src/captioner/assets/lite2-int8.onnx missing"
    q, f = Encoder.load("lite2", backend="onnx", int8=True), Encoder.load("lite2", backend="onnx")
    assert (q.backend, f.backend) == ("onnx-int8", "onnx")
    x = np.stack([preprocess(load_image(p), spec) for p in dog_paths])
    together = q.encode(x)
    alone = np.concatenate([q.encode(x[i:i + 1]) for i in range(len(x))])
    assert np.array_equal(together, alone)
    exact = f.encode(x)
    cos = (together * exact).sum(-1) / (np.linalg.norm(together, axis=-1) * np.linalg.norm(exact, axis=-1) + 1e-9)
    assert np.median(cos) > 0.97 and not np.array_equal(together, exact)
    assert Captioner.load().int8_encoder and not Captioner.load(int8=False).int8_encoder
