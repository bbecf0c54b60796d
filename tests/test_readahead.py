"""Reading ahead on threads (apps/readahead.py) changes when photos are read, not what they are told."""
from captioner.apps.api import Captioner
from captioner.apps.readahead import caption_paths, read_ahead
from captioner.data.images import ImageError


def test_read_ahead_gives_the_captions_of_caption_batch(flickr8k_root, model_path, tmp_path):
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:10]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths = [flickr8k_root / "images" / n for n in names[:5]] + [broken] + \
            [flickr8k_root / "images" / n for n in names[5:]]
    c = Captioner.load(model_path)
    got = [(batch, results) for batch, results in caption_paths(c, paths, batch_size=4)]
    assert [b for b, _ in got] == [paths[0:4], paths[4:8], paths[8:11]]
    results = [r for _, rs in got for r in rs]
    assert isinstance(results[5], ImageError) and str(results[5]).startswith(f"{broken}: ")
    # the same batches, minus the broken photo, through caption_batch from the files
    want = c.caption_batch(paths[0:4]) + c.caption_batch(paths[4:8]) + c.caption_batch(paths[8:11])
    for r, w in zip(results, want):
        if isinstance(w, ImageError):
            continue
        assert r.to_dict() == w.to_dict()  # source (the path) included


def test_closing_early_stops_reading(flickr8k_root):
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:40]
    batches = read_ahead([flickr8k_root / "images" / n for n in names], 4, 260)
    batch, items = next(batches)
    assert len(batch) == 4 and all(im.size == (260, 260) for im in items)
    batches.close()  # returns once the reads in flight are done; the rest are never started
