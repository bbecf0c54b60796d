"""report.html: one self-contained page to read an evaluation by eye.

Per image: a small embedded thumbnail, the generated caption, the references and the per-image
scores, in a table that sorts by any column (a few lines of inline JS, nothing fetched). Above it
the corpus scores, below it per-word attention overlays for a sample of images.
"""
from __future__ import annotations

import base64
import html
import re
import io
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.io import atomic_write_text

METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
                "meteor": "METEOR", "rougeL": "ROUGE-L", "cider": "CIDEr-D",
                "chair_i": "CHAIR-i", "chair_s": "CHAIR-s", "object_recall": "object recall"}


def plot_attention(image: Image.Image, words: list[str], attention: np.ndarray, path_or_buffer,
                   *, columns: int = 6, panel_inches: float = 1.8, dpi: int = 72) -> None:
    """Draw the photo, then one panel per word with its (gh, gw) attention map upsampled over it.

    attention: (T, gh, gw) with T == len(words). Writes a PNG to a path or a binary file object.
    Uses matplotlib's object API (no pyplot), so it keeps no global figure state and is thread-safe.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 3 or attention.shape[0] != len(words):
        raise ValueError(f"attention must be (len(words)={len(words)}, gh, gw), got {attention.shape}")
    image = image.convert("RGB")
    w, h = image.size
    panels = len(words) + 1
    cols = min(columns, panels)
    rows = -(-panels // cols)
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches * h / w + 0.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    for ax, word, att in zip(axes[1:], words, attention):
        ax.imshow(image)
        # extent stretches the coarse grid over the whole photo; bilinear smooths the cell edges
        ax.imshow(att, cmap="jet", alpha=0.55, extent=(0, w, h, 0), interpolation="bilinear",
                  vmin=0.0, vmax=float(attention.max()) or 1.0)
        ax.set_title(word, fontsize=9)
    fig.tight_layout(pad=0.3)
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    # a 256-colour palette makes the PNG ~5x smaller at no visible cost, so reports stay light
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    rgb.quantize(256).save(path_or_buffer, format="PNG", optimize=True)


def thumbnail_data_uri(path: str | Path | None, size: int = 128) -> str | None:
    """A small base64 JPEG of the image, or None when it cannot be read (the row is still shown)."""
    if path is None:
        return None
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=70)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f0f0f0} #images th{cursor:pointer} #images th:hover{background:#e0e0ff}
ul{margin:0;padding-left:1.2em} .cap{font-weight:600} .num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{max-width:128px} figure{margin:1em 0} figcaption{font-weight:600}
"""
# Click a header to sort by it; click again to reverse. Cells carry their sort key in data-v.
_SCRIPT = """
document.querySelectorAll('#images th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const dir = th.dataset.dir = th.dataset.dir === 'desc' ? 'asc' : 'desc';
  const key = r => { const v = r.cells[col].dataset.v; return isNaN(v) ? v : parseFloat(v); };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (dir === 'asc' ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
"""


def _mark(caption: str, words: set[str]) -> str:
    """The caption, HTML-escaped, with the given (object) words in <mark>: the false objects CHAIR counts."""
    if not words:
        return html.escape(caption)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    parts = pattern.split(caption)
    return "".join(f"<mark>{html.escape(p)}</mark>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def write_report(path, items: list[dict], corpus_scores: dict, *, title: str = "Caption evaluation",
                 info: dict | None = None, attention: list[dict] | None = None) -> None:
    """Write a self-contained report.html.

    items: [{"image_id", "caption", "references": [str], "scores": {metric: float}, "path": image or None}]
    corpus_scores: {metric: float or None}; info: extra key/values shown at the top (split, model, ...);
    attention: [{"image_id", "path", "words", "attention" (T, gh, gw)}] drawn as overlays.
    """
    esc = html.escape
    metrics = [k for k in METRIC_NAMES if k in corpus_scores]
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    if info:
        out.append("<p>" + " &middot; ".join(f"{esc(str(k))}: <b>{esc(str(v))}</b>" for k, v in info.items())
                   + "</p>")
    out.append("<h2>Corpus scores</h2><table><tr>" + "".join(f"<th>{METRIC_NAMES[k]}</th>" for k in metrics)
               + "</tr><tr>" + "".join(f"<td class='num'>{_fmt(corpus_scores[k])}</td>" for k in metrics)
               + "</tr></table>")

    per_image = [k for k in ("cider", "bleu4", "meteor", "rougeL")
                 if any(k in it.get("scores", {}) for it in items)]
    items = sorted(items, key=lambda it: -it.get("scores", {}).get("cider", 0.0))
    out.append(f"<h2>Images ({len(items)})</h2><p>Click a column header to sort.</p><table id='images'><thead><tr>"
               "<th>image</th><th>generated caption</th><th>references</th>"
               + "".join(f"<th>{METRIC_NAMES[k]}</th>" for k in per_image) + "</tr></thead><tbody>")
    for it in items:
        uri = thumbnail_data_uri(it.get("path"))
        pic = f"<img class='thumb' src='{uri}' alt='{esc(it['caption'])}'><br>" if uri else ""
        refs = "".join(f"<li>{esc(r)}</li>" for r in it.get("references", []))
        cells = "".join(f"<td class='num' data-v='{it['scores'].get(k, -1):.6f}'>{_fmt(it['scores'].get(k))}</td>"
                        for k in per_image)
        objects = it.get("objects") or {}
        false = set(objects.get("false_words", []))
        notes = (f"<br><small>confidence {it['confidence']:.2f}</small>" if it.get("confidence") is not None else "")
        if false:
            notes += "<br><small>objects no reference names: " + ", ".join(f"<mark>{esc(w)}</mark>" for w in
                                                                           sorted(false)) + "</small>"
        out.append(f"<tr><td data-v='{esc(it['image_id'])}'>{pic}{esc(it['image_id'])}</td>"
                   f"<td class='cap' data-v='{esc(it['caption'])}'>{_mark(it['caption'], false)}{notes}</td>"
                   f"<td data-v=''><ul>{refs}</ul></td>{cells}</tr>")
    out.append("</tbody></table>")

    if attention:
        out.append("<h2>Where the model looked, word by word</h2>")
        for a in attention:
            try:
                with Image.open(a["path"]) as img:
                    buf = io.BytesIO()
                    plot_attention(img, a["words"], a["attention"], buf)
            except (OSError, ValueError) as e:
                out.append(f"<p>{esc(a['image_id'])}: no overlay ({esc(str(e).splitlines()[0])})</p>")
                continue
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            out.append(f"<figure><figcaption>{esc(a['image_id'])}: {esc(' '.join(a['words']))}</figcaption>"
                       f"<img src='{uri}' alt='attention maps for {esc(a['image_id'])}'></figure>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    atomic_write_text(path, "\n".join(out))
