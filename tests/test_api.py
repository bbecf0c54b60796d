"""The Python API: any image-like input gives the same caption; odd and broken images are handled."""
import io
from pathlib import Path

import numpy as np
import torch
import pytest
from helpers import png_bomb
from PIL import Image

from captioner.apps.api import Captioner, CaptionResult
from captioner.data.images import ImageError
from captioner.features.encoder import Encoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def captioner(model_path):
    return Captioner.load(model_path)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A small photo-like RGB image with structure in it (not symmetric, so rotations change it)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    arr = np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)
    arr[10:40, 20:90] = rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("api") / "photo.png"
    Image.fromarray(arr).save(path)
    return path


def key(r: CaptionResult):
    return r.caption, r.score


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_path_bytes_and_pil_image_agree(captioner, photo):
    by_path = captioner.caption(photo)
    assert by_path.caption == " ".join(by_path.tokens) and by_path.tokens
    assert np.isfinite(by_path.score) and by_path.score < 0  # a sum of log-probabilities
    assert by_path.source == str(photo)
    assert key(captioner.caption(photo.read_bytes())) == key(by_path)
    assert key(captioner.caption(Image.open(photo))) == key(by_path)
    assert key(captioner.caption(str(photo))) == key(by_path)
    d = by_path.to_dict()
    assert d["caption"] == by_path.caption and "attention" not in d


def test_n_best_alternatives_are_sorted_and_distinct(captioner, photo):
    r = captioner.caption(photo, beam_size=4, n_best=4)
    scores = [a["score"] for a in r.alternatives]
    assert 1 < len(r.alternatives) <= 4
    assert scores == sorted(scores, reverse=True)
    assert r.alternatives[0] == {"caption": r.caption, "score": r.score}
    assert len({a["caption"] for a in r.alternatives}) == len(r.alternatives)
    assert len(captioner.caption(photo, beam_size=4).alternatives) == 1


def test_attention_has_one_grid_per_word(captioner, photo):
    r = captioner.caption(photo, attention=True)
    gh, gw = captioner.info["grid"]
    assert r.attention.shape == (len(r.tokens), gh, gw)
    np.testing.assert_allclose(r.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)  # a softmax over regions
    assert captioner.caption(photo).attention is None
    d = r.to_dict(attention=True)
    assert np.asarray(d["attention"]).shape == r.attention.shape


def test_batch_keeps_order_and_returns_errors_in_place(captioner, photo, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    out = captioner.caption_batch([photo, empty, b"not an image", photo.read_bytes()])
    assert isinstance(out[1], ImageError) and str(out[1]) == f"{empty}: empty file (0 bytes)"
    assert isinstance(out[2], ImageError) and "not an image" in str(out[2])
    assert key(out[0]) == key(out[3]) == key(captioner.caption(photo))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, this is text\n", "not an image"),
    (png_bomb(), "pixels"),
])
def test_bad_bytes_raise_one_line_errors(captioner, data, reason):
    with pytest.raises(ImageError, match=reason) as e:
        captioner.caption(data)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_refused(captioner, photo):
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").save(buf, format="JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        captioner.caption(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_transparent_png_is_shown_on_white(captioner):
    clear_red = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    assert key(captioner.caption(png_bytes(clear_red))) == key(captioner.caption(png_bytes(white)))
    assert captioner.caption(png_bytes(red)).score != captioner.caption(png_bytes(white)).score


def test_16_bit_png_matches_8_bit(captioner, photo):
    grey8 = np.asarray(Image.open(photo).convert("L"))
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)  # full 16-bit range, same picture
    assert grey16.mode.startswith("I")
    data = png_bytes(grey16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    assert key(captioner.caption(data)) == key(captioner.caption(png_bytes(Image.fromarray(grey8))))


def test_gif_uses_its_first_frame(captioner, photo):
    first = Image.open(photo).convert("RGB").quantize(64)
    second = Image.new("RGB", first.size, (0, 200, 0)).quantize(64)
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second], duration=100)
    gif = buf.getvalue()
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    frame0 = Image.open(io.BytesIO(gif)).convert("RGB")  # what the GIF decodes to, losslessly re-encoded
    assert key(captioner.caption(gif)) == key(captioner.caption(png_bytes(frame0)))


def test_exif_rotation_is_applied(captioner, photo):
    upright = Image.open(photo).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # stored as a camera held on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    shown = decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270)  # what a viewer shows
    assert shown.size == upright.size
    got = captioner.caption(buf.getvalue())
    assert key(got) == key(captioner.caption(png_bytes(shown)))
    assert got.score != captioner.caption(png_bytes(decoded.convert("RGB"))).score


@pytest.mark.parametrize("make", [
    lambda p: Image.open(p).convert("CMYK"),
    lambda p: Image.open(p).convert("L"),
    lambda p: Image.open(p).convert("1"),
    lambda p: Image.new("RGB", (1, 1), (120, 60, 30)),
    lambda p: Image.new("RGB", (3000, 20), (10, 20, 30)),
], ids=["cmyk", "grey", "bilevel", "1x1", "very-wide"])
def test_unusual_but_valid_images_are_captioned(captioner, photo, make):
    img = make(photo)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if img.mode == "CMYK" else "PNG")
    r = captioner.caption(buf.getvalue())
    assert r.tokens and np.isfinite(r.score)


def test_info_describes_the_model(captioner, model_path):
    info = captioner.info
    assert info["path"] == str(model_path)
    assert info["encoder"] == "lite2" and info["grid"] == [9, 9]
    assert info["vocab_size"] == len(captioner.vocab) and info["backend"] in ("onnx-int8", "onnx", "torch")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint file"):
        Captioner.load(tmp_path / "nope.safetensors")


def test_int8_decoder_writes_nearly_the_same_captions(captioner, model_path, flickr8k_root):
    """int8 weights are the default; on real photos they mostly give the float model's captions (the dev
    scores match: benchmarks/levers.py --int8), and a checkpoint without measured ranges decodes in float."""
    # plain decoding on both sides: the grounding's hedges would hide what the weights do
    checkpoint = captioner.runtime.checkpoint
    float_cnn = Encoder.load("lite2", backend="onnx")  # the decoders' difference alone, on the same float grids
    exact = Captioner(checkpoint, float_cnn, int8=False, grounded=False)
    captioner = Captioner(checkpoint, float_cnn, grounded=False)
    assert captioner.info["decoder_weights"] == "int8" and exact.info["decoder_weights"] == "float32"
    assert "quantized" in type(captioner.runtime.model.out.layer).__module__
    assert type(exact.runtime.model.out) is torch.nn.Linear
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:24]
    photos = [flickr8k_root / "images" / n for n in names]
    fast, slow = captioner.caption_batch(photos), exact.caption_batch(photos)
    same = sum(a.caption == b.caption for a, b in zip(fast, slow))
    assert same >= 16, [(a.caption, b.caption) for a, b in zip(fast, slow) if a.caption != b.caption]
    assert all(abs(a.score - b.score) < 0.5 for a, b in zip(fast, slow) if a.caption == b.caption)
    ranges = dict(checkpoint.meta)
    ranges.pop("int8_ranges")
    old = Captioner(type(checkpoint)(**{**vars(checkpoint), "meta": ranges}), captioner.encoder)
    assert old.info["decoder_weights"] == "float32"


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_what_people_get_is_the_training_time_search(captioner, flickr8k_root, beam):
    """Captioner searches with beam.py's numpy beam search over the int8 torch step; decode.decode (dev scoring,
    levers, pseudo-captions) searches in torch. Same n-best lists and scores, batched or one photo at a time,
    with the grounding bias on."""
    from captioner.decode import decode
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:6]
    feats = captioner.encoder.encode_images([flickr8k_root / "images" / n for n in names] +
                                            sorted(EXAMPLES.glob("*.jpg")))
    rt = captioner.runtime
    concepts, evidence, familiarity, _ = rt.heads(feats)
    bias = captioner.describer.word_bias(concepts, evidence, captioner.describer.familiar(concepts, familiarity),
                                         captioner.vocab.itos)
    with torch.inference_mode():
        want = decode(rt.model, rt.vocab, torch.from_numpy(feats), beam_size=beam, n_best=beam,
                      bias=torch.from_numpy(bias))
    batched = rt.decode(feats, bias, beam_size=beam, max_len=30, n_best=beam)
    alone = [rt.decode(feats[i:i + 1], bias[i:i + 1], beam_size=beam, max_len=30, n_best=beam)[0]
             for i in range(len(feats))]
    for w, b, a in zip(want, batched, alone):
        assert [h.text for h in w] == [h.text for h in b] == [h.text for h in a]
        assert [h.score for h in b] == pytest.approx([h.score for h in w], abs=1e-4)


def test_the_traced_decoder_step_is_the_model_step_at_any_batch_and_beam(captioner):
    """TorchRuntime runs model.step traced once on one blank photo (runtime._traced_step); a trace that fixed the
    batch, beam or region count would go wrong only on other shapes, so every shape here is checked exactly."""
    rt = captioner.runtime
    assert isinstance(rt.step, torch.jit.ScriptModule)
    grids = torch.from_numpy(captioner.encoder.encode_images(sorted(EXAMPLES.glob("*.jpg"))))
    with torch.inference_mode():
        for images, beams in [(1, 1), (1, 3), (2, 5), (5, 3)]:
            values, keys, h, c = rt.model.init_state(grids[:images])
            rows = torch.arange(images).repeat_interleave(beams)
            state = (values, keys, h[rows], c[rows])
            tokens = torch.arange(len(rows)) + 4
            for want, got in zip(rt.model.step(tokens, state), rt.step(tokens, state)):
                for w, g in zip(*((want, got) if isinstance(want, tuple) else ((want,), (got,)))):
                    assert torch.equal(w, g)
