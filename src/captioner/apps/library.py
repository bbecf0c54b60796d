"""A searchable photo and video library: caption every image, and every scene of every video, under a folder
into SQLite, then search it by words.

One SQLite file holds everything:
- `images`: one row per file (path, size, mtime, sha256, caption, n-best JSON, tags JSON, model, date,
  or the error that stopped it being captioned); a video's row has no caption of its own,
- `scenes`: one row per scene of a video (images.id of the video, start and end seconds, description,
  the model's own sentence, confidence, tags JSON), as `captioner.apps.video.describe_video` finds them,
- `images_fts`: an FTS5 index over caption, the other n-best captions and tags, tokenised with Porter
  stemming so "dogs running" finds "a dog runs". A photo's rowid is its images.id, a scene's is -scenes.id:
  one table, so one bm25 ranks photos and scenes together (two tables would weigh words by different counts),
- `tags`: (image_id, tag) pairs so tag counts are one GROUP BY; a video counts once per tag.

Indexing is incremental (size/mtime first, then the content hash) and commits per batch of photos and per
video, so a second run only captions new or changed files and an interrupted run keeps everything written.
Libraries made before videos were indexed (schema version 1) get the `scenes` table when next indexed, and
are searched as they are until then.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from captioner.apps.video import VIDEO_SUFFIXES, VideoError, describe_video

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
# Image files found in folders that cannot be read, reported as skipped rather than passed over in silence.
UNSUPPORTED_EXTS = {
    **dict.fromkeys((".svg", ".svgz"), "vector images (SVG) are not supported; render them to PNG"),
    ".jxl": "JPEG XL is not supported; convert it to JPEG",
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"),
                    "camera raw files are not supported; export them to JPEG"),
}
SCHEMA_VERSION = 2  # 2: + the scenes table (videos); version 1 is migrated by adding it (_connect)
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another one's lock (a batch of captions) before failing
# bm25 column weights: the best caption counts most, tags (its content words, lemmatised) next,
# the lower-ranked n-best captions least. Chosen with benchmarks/retrieval.py on Flickr8k dev.
WEIGHTS = (4.0, 1.0, 2.0)

STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for from by with without into onto over under up down out off
about above below across along around behind beside between beyond near through toward towards upon
while as than then there here this that these those it its is are was were be been being am has have
had do does did some any each every other another such very too also just only own same so not no
his her hers him he she they them their theirs we us our you your i me my one two three four five
who whom whose which what where when why how all both few more most many much several
image may contain probably sure photo shows
""".split())  # the last line: the words of a hedged description (grounding.py), not of the photo

# Plurals that the suffix rules below would get wrong; the common ones in photo captions.
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
              "teeth": "tooth", "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf",
              "wolves": "wolf", "shelves": "shelf"}

_SCENES_COLUMNS = """(
    id INTEGER PRIMARY KEY,         -- its images_fts rowid is -id (photos hold the positive rowids)
    image_id INTEGER NOT NULL,      -- images.id of the video
    start_s REAL NOT NULL,          -- seconds from the video's first frame
    end_s REAL NOT NULL,
    caption TEXT NOT NULL,          -- the scene's description (hedged when the model is unsure)
    model_caption TEXT,             -- the model's own sentence
    confidence REAL,
    tags TEXT                       -- JSON list: confident concepts, then content words
)"""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,      -- absolute path as found under the indexed folder
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    caption TEXT,                   -- best caption, NULL when the file could not be captioned
    nbest TEXT,                     -- JSON [{"caption", "score"}], best first: the result's alternatives
    tags TEXT,                      -- JSON list of content words, most frequent first
    model TEXT,
    captioned_at TEXT,              -- ISO 8601 UTC
    error TEXT                      -- why this file has no caption
);
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(caption, alternatives, tags,
    tokenize = 'porter unicode61');
CREATE TABLE IF NOT EXISTS tags (image_id INTEGER NOT NULL, tag TEXT NOT NULL);  -- image_id: images.id, the row
CREATE INDEX IF NOT EXISTS tags_by_image ON tags(image_id);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
CREATE TABLE IF NOT EXISTS roots (folder TEXT PRIMARY KEY, indexed_at TEXT);  -- folders given to index
CREATE TABLE IF NOT EXISTS scenes """ + _SCENES_COLUMNS + """;
CREATE INDEX IF NOT EXISTS scenes_by_image ON scenes(image_id);
"""


# -----------------------------------------------------------------------------
# words

def words(text: str) -> list[str]:
    """Lower-case word tokens; everything that is not a letter, digit or apostrophe separates words."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)?", text.lower())


def lemma(word: str) -> str:
    """Lemma-light: undo English plurals only, so tags read as words ("dogs" -> "dog", "children" -> "child")."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "'s")):
        return word[:-1]
    return word


def caption_tags(captions: list[str]) -> list[str]:
    """Content words of the captions, stop words removed, most frequent first (ties: first seen)."""
    counts: dict[str, int] = {}
    for text in captions:
        for w in words(text):
            if w in STOP_WORDS or len(w) < 2 or w.isdigit() or w.startswith("<"):
                continue
            w = lemma(w.removesuffix("'s"))
            counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: -counts[w])  # sorted() is stable, so ties keep first-seen order


# -----------------------------------------------------------------------------
# database

def _connect(db_path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a library for writing. Two indexers may start on the same new file at
    once: the busy timeout makes the second wait for the first's lock instead of failing with "database is
    locked", and the schema is checked and created inside one write transaction, so neither ever sees the
    other's half-made schema. A version-1 library is migrated here: the schema's CREATE ... IF NOT EXISTS
    statements add what version 2 added (the scenes table), and its rows stay as they are."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S)
    try:
        con.execute("BEGIN IMMEDIATE")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        if names and (version not in (1, SCHEMA_VERSION) or "images" not in names):
            raise ValueError(f"{db_path}: not a captioner library (schema version {version}, "
                             f"tables {sorted(names)[:3]})")
        for statement in _SCHEMA.split(";"):  # not executescript: it would commit before each script
            if statement.strip():
                con.execute(statement)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.commit()
        _use_wal(con)
    except sqlite3.OperationalError as e:  # locked for longer than the busy timeout, read-only, disk full
        con.close()
        raise ValueError(f"{db_path}: {e}") from None
    except sqlite3.DatabaseError as e:
        con.close()
        raise ValueError(f"{db_path}: not an SQLite database ({e})") from None
    except BaseException:
        con.close()
        raise
    return con


def _use_wal(con: sqlite3.Connection) -> None:
    """Write-ahead logging, so the web server can search while a folder is being indexed. Switching to it needs
    the file to itself, and while another indexer holds a lock the switch fails at once, without the busy
    timeout (1 in 30 pairs of indexers starting on one new library, under load): it is retried for as long."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _open_readonly(db_path: str | Path) -> sqlite3.Connection:
    """Open an existing library for reading; never creates an empty database by mistake."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no such library (build it with `captioner index FOLDER --db {db_path}`)")
    con = sqlite3.connect(db_path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as e:
        con.close()
        raise ValueError(f"{db_path}: not an SQLite database ({e})") from None
    if not {"images", "images_fts", "tags"} <= names:
        con.close()
        raise ValueError(f"{db_path}: not a captioner library (no images/images_fts/tags tables)")
    if "scenes" not in names:  # made before videos were indexed (version 1): read as a library of no scenes
        con.execute(f"CREATE TEMP TABLE scenes {_SCENES_COLUMNS}")
    return con


def _clear(con: sqlite3.Connection, row_id: int) -> None:
    """Unindex a file, keeping its row: its text, its tags, and a video's scenes with their text."""
    con.execute("DELETE FROM images_fts WHERE rowid = ?", (row_id,))
    con.execute("DELETE FROM images_fts WHERE rowid IN (SELECT -id FROM scenes WHERE image_id = ?)", (row_id,))
    con.execute("DELETE FROM scenes WHERE image_id = ?", (row_id,))
    con.execute("DELETE FROM tags WHERE image_id = ?", (row_id,))


def _delete(con: sqlite3.Connection, row_id: int) -> None:
    _clear(con, row_id)
    con.execute("DELETE FROM images WHERE id = ?", (row_id,))


def _ranked(result) -> list[dict]:
    ranked = result.alternatives or [{"caption": result.caption, "score": result.score}]
    return [{"caption": a["caption"], "score": float(a["score"])} for a in ranked]


def _tag_words(concepts: list[str], captions: list[str]) -> list[str]:
    """Tags as the library and photo metadata keep them: the confident concepts first (cat, cup:
    grounding.py), then the content words of the descriptions."""
    return list(dict.fromkeys(concepts + caption_tags(captions)))


def result_tags(result) -> list[str]:
    """A CaptionResult's tags: its concepts at least 0.5 probable, then the words of its description and n-best."""
    return _tag_words([c["word"] for c in result.concepts if c["p"] >= 0.5],
                      [result.text] + [a["caption"] for a in _ranked(result)])


def _index_text(con, rowid: int, caption: str, others: str, tag_list: list[str]) -> None:
    con.execute("INSERT INTO images_fts (rowid, caption, alternatives, tags) VALUES (?, ?, ?, ?)",
                (rowid, caption, others, " ".join(tag_list)))


def _store(con, path: str, size: int, mtime_ns: int, sha: str | None, *, result=None, error: str | None = None,
           model: str | None = None) -> int:
    """Insert or replace one file's row, keeping images, images_fts and tags in step; returns the row's id.
    Without a result the row is not searchable (an unreadable file, or a video: its scenes are)."""
    caption = alternatives = tag_list = None
    if result is not None:
        caption = result.text  # what people are told: hedged when the model is unsure
        alternatives = _ranked(result)
        tag_list = result_tags(result)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    row_id = con.execute(
        """INSERT INTO images (path, size, mtime_ns, sha256, caption, nbest, tags, model, captioned_at, error)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,
               sha256 = excluded.sha256, caption = excluded.caption, nbest = excluded.nbest,
               tags = excluded.tags, model = excluded.model, captioned_at = excluded.captioned_at,
               error = excluded.error
           RETURNING id""",
        (path, size, mtime_ns, sha, caption, json.dumps(alternatives) if alternatives else None,
         json.dumps(tag_list) if tag_list is not None else None, model, now, error)).fetchone()[0]
    _clear(con, row_id)
    if caption is not None:
        _index_text(con, row_id, caption, " | ".join(a["caption"] for a in alternatives[1:]), tag_list)
        con.executemany("INSERT INTO tags (image_id, tag) VALUES (?, ?)", [(row_id, t) for t in tag_list])
    return row_id


def _store_video(con, path: str, size: int, mtime_ns: int, sha: str, cues: list, *, error: str | None = None,
                 model: str | None = None) -> None:
    """Insert or replace a video's row and one searchable scenes row per cue (`video.Cue`); `error`: the damage
    the scenes stop at. The video's tags are its scenes' tags, each once."""
    row_id = _store(con, path, size, mtime_ns, sha, error=error, model=model)
    video_tags: dict[str, None] = {}
    for cue in cues:
        tag_list = _tag_words(cue.tags, [cue.text, cue.caption])
        scene_id = con.execute(
            """INSERT INTO scenes (image_id, start_s, end_s, caption, model_caption, confidence, tags)
               VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id""",
            (row_id, cue.start, cue.end, cue.text, cue.caption, cue.confidence, json.dumps(tag_list))).fetchone()[0]
        _index_text(con, -scene_id, cue.text, cue.caption if cue.caption != cue.text else "", tag_list)
        video_tags.update(dict.fromkeys(tag_list))
    con.executemany("INSERT INTO tags (image_id, tag) VALUES (?, ?)", [(row_id, t) for t in video_tags])


# -----------------------------------------------------------------------------
# indexing

def error_line(path, err: Exception) -> str:
    """"PATH: reason" on one line, for an error whose message may already name the file (or "<bytes>")."""
    msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
    for prefix in (f"{path}: ", "<bytes>: "):
        msg = msg.removeprefix(prefix)
    return f"{path}: {msg}"


def find_media(folder: Path, skipped: list[str] | None = None) -> tuple[list[Path], list[Path]]:
    """(image files, video files) under folder, recursively, each sorted; hidden files and folders
    (".thumbnails", temp files) skipped. Images in formats that cannot be read (SVG, JPEG XL, camera raw) are
    added to `skipped` as "PATH: reason". Videos are what `captioner caption` describes (video.VIDEO_SUFFIXES)."""
    images, videos = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            ext = os.path.splitext(f)[1].lower()
            if f.startswith("."):
                continue
            if ext in IMAGE_EXTS:
                images.append(Path(root) / f)
            elif ext in VIDEO_SUFFIXES:
                videos.append(Path(root) / f)
            elif ext in UNSUPPORTED_EXTS and skipped is not None:
                skipped.append(f"{Path(root) / f}: {UNSUPPORTED_EXTS[ext]}")
    return sorted(images), sorted(videos)


def find_images(folder: Path, skipped: list[str] | None = None) -> list[Path]:
    """The image files of `find_media`."""
    return find_media(folder, skipped)[0]


def library_roots(db_path) -> list[Path]:
    """The folders a library was built from. Libraries made before these were recorded count the deepest
    folder that holds all their images."""
    with closing(_open_readonly(db_path)) as con:
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'roots'").fetchone():
            folders = [Path(r[0]) for r in con.execute("SELECT folder FROM roots ORDER BY folder")]
            if folders:
                return folders
        paths = [r[0] for r in con.execute("SELECT path FROM images")]
    return [Path(os.path.commonpath(paths)) if len(paths) > 1 else Path(paths[0]).parent] if paths else []


def index_folder(folder, db_path, captioner=None, *, beam_size: int = 3, n_best: int = 3, batch_size: int = 16,
                 progress: bool = True, recaption: bool = False, ray: dict | None = None) -> dict:
    """Caption every image, and every scene of every video, under `folder` into the SQLite library at
    `db_path`; returns a summary dict.

    Only new or changed files are captioned (a changed size/mtime with an unchanged sha256 just updates the
    row), rows of files that disappeared from the folder are removed, and each batch of images and each video
    is committed on its own. A video is described as `captioner caption clip.mp4` describes it
    (`video.describe_video`), one library entry per scene. Unreadable images and videos are stored with their
    error and listed in summary["errors"] (a damaged video keeps the scenes before the damage); they are
    retried only once the file changes. `captioner` is a `captioner.Captioner` or a function that loads one;
    None loads the shipped model; either only when something needs captioning. `recaption` captions every file
    again (after a model upgrade). Counts: "found" images and "videos"; "captioned" images, "described" videos
    and their "scenes".

    `ray`: the photos are captioned on Ray instead (`scale.run_batches`'s options: address, workers, num_cpus,
    and the workers' model, int8, grounded, backend, runtime), in the batches this process would caption; this
    process still writes every row, and describes the videos with `captioner`.
    """
    folder = Path(folder).absolute()
    db_path = Path(db_path)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    skipped: list[str] = []
    files, videos = find_media(folder, skipped)
    summary = {"folder": str(folder), "db": str(db_path), "found": len(files), "videos": len(videos),
               "captioned": 0, "described": 0, "scenes": 0, "unchanged": 0, "touched": 0, "failed": 0,
               "removed": 0, "model": None, "errors": [], "skipped": skipped}

    with closing(_connect(db_path)) as con:
        # what the web server confines /api/library/image to
        con.execute("INSERT OR REPLACE INTO roots (folder, indexed_at) VALUES (?, ?)",
                    (str(folder), datetime.now(timezone.utc).isoformat(timespec="seconds")))
        known = _known_rows(con, folder)
        summary["removed"] = _forget_gone(con, known, files + videos)
        con.commit()
        indexer = _Indexer(con, known, summary, captioner, beam_size=beam_size, n_best=n_best, recaption=recaption)
        pending = indexer.changed(files)
        if ray is not None:
            indexer.index_on_ray(pending, batch_size, ray | {"progress": progress})
        else:
            bar = tqdm(total=len(pending), desc="indexing", unit="img", disable=not progress or not pending)
            for start in range(0, len(pending), batch_size):
                indexer.index(pending[start:start + batch_size])
                con.commit()  # per batch: an interrupted run loses at most this batch
                bar.update(min(batch_size, len(pending) - start))
            bar.close()
        pending = indexer.changed(videos)
        for p, size, mtime_ns in tqdm(pending, desc="videos", unit="video", disable=not progress or not pending):
            indexer.index_video(p, size, mtime_ns, progress=progress)
            con.commit()  # per video: an interrupted run loses at most the video being described
        summary["model"] = indexer.model_name
    return summary


def _known_rows(con: sqlite3.Connection, folder: Path) -> dict[str, tuple]:
    """path -> (row id, size, mtime_ns, sha256, indexed: has a caption or scenes) of the rows under `folder`."""
    known = {}
    for row_id, path, size, mtime_ns, sha, indexed in con.execute(
            """SELECT id, path, size, mtime_ns, sha256,
                      caption IS NOT NULL OR EXISTS (SELECT 1 FROM scenes WHERE image_id = images.id)
               FROM images"""):
        if Path(path).is_relative_to(folder):
            known[path] = (row_id, size, mtime_ns, sha, bool(indexed))
    return known


def _forget_gone(con: sqlite3.Connection, known: dict, files: list[Path]) -> int:
    """Delete the rows of files that are gone from the folder; returns how many."""
    present = {str(p) for p in files}
    gone = [row[0] for path, row in known.items() if path not in present]
    for row_id in gone:
        _delete(con, row_id)
    return len(gone)


class _Indexer:
    """Brings the rows of a folder's files up to date, batch by batch, counting into `summary`."""

    def __init__(self, con, known: dict, summary: dict, captioner, *, beam_size: int, n_best: int, recaption: bool):
        self.con, self.known, self.summary, self.captioner = con, known, summary, captioner
        self.beam_size, self.n_best, self.recaption = beam_size, n_best, recaption
        self.model_name: str | None = None

    def changed(self, files: list[Path]) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of the files to look at: size and mtime unchanged means the stored row is
        trusted without reading the file."""
        pending = []
        for p in files:
            try:
                st = p.stat()
            except OSError as e:
                self._fail(p, f"{p}: {e.strerror or e}")
                continue
            row = self.known.get(str(p))
            if row and row[1] == st.st_size and row[2] == st.st_mtime_ns and not self.recaption:
                self.summary["unchanged"] += 1
            else:
                pending.append((p, st.st_size, st.st_mtime_ns))
        return pending

    def index(self, batch: list[tuple[Path, int, int]]) -> None:
        """Read and hash a batch; caption the files whose content is new."""
        to_caption = []  # (path, size, mtime_ns, sha, bytes)
        for p, size, mtime_ns in batch:
            try:
                data = p.read_bytes()
            except OSError as e:
                self._fail(p, f"{p}: {e.strerror or e}", stored=(size, mtime_ns, None))
                continue
            sha = hashlib.sha256(data).hexdigest()
            if not self._touched(p, size, mtime_ns, sha):
                to_caption.append((p, size, mtime_ns, sha, data))
        if to_caption:
            self._caption(to_caption)

    def index_video(self, p: Path, size: int, mtime_ns: int, *, progress: bool) -> None:
        """Hash a video; describe the scenes of a new one and store them, or its damage as one error line."""
        sha = self._hash(p, size, mtime_ns)
        if sha is None or self._touched(p, size, mtime_ns, sha):
            return
        error = None
        try:
            cues = describe_video(self._loaded(), p, progress=progress)
        except VideoError as e:
            cues, error = e.cues, error_line(p, e)
            if cues:
                error += f" ({len(cues)} scene{'s' if len(cues) != 1 else ''} before it indexed)"
        _store_video(self.con, str(p), size, mtime_ns, sha, cues, error=error, model=self.model_name)
        self.summary["scenes"] += len(cues)
        if error:
            self._fail(p, error)
        else:
            self.summary["described"] += 1

    def index_on_ray(self, pending: list[tuple[Path, int, int]], batch_size: int, options: dict) -> None:
        """What `index` does with each batch of `pending`, with the captioning on Ray (scale.run_batches, in
        library mode): the batches are `index`'s, less the touched files; each is stored as it comes back."""
        from captioner.apps import scale
        batches, stats = [], {}
        for start in range(0, len(pending), batch_size):
            batch = [item for item in pending[start:start + batch_size] if not self._hashed_unchanged(*item)]
            batches += [[str(p) for p, _, _ in batch]] if batch else []
            stats.update((str(p), (size, mtime_ns)) for p, size, mtime_ns in batch)
        self.con.commit()  # the touched rows, before the long part
        if not batches:  # nothing new: no Ray instance, no workers
            return
        rows = scale.run_batches(batches, library=True, beam=self.beam_size, n_best=self.n_best, **options)
        with closing(rows):
            for batch in rows:
                for path, record, error in batch:
                    self._store_remote(Path(path), *stats[path], json.loads(record) if record else {}, error)
                self.con.commit()  # per batch back: an interrupted run loses only the batches in flight

    def _store_remote(self, p: Path, size: int, mtime_ns: int, record: dict, error: str) -> None:
        """Store a photo a Ray worker read (record: {"sha256", "model", "result"}) or could not read (no record)."""
        from captioner.apps.api import CaptionResult
        self.model_name = self.model_name or record.get("model")
        if error:
            self._fail(p, error, stored=(size, mtime_ns, record.get("sha256")), model=record.get("model"))
        else:
            self._keep(p, size, mtime_ns, record["sha256"], CaptionResult(**record["result"]), record["model"])

    def _hashed_unchanged(self, p: Path, size: int, mtime_ns: int) -> bool:
        """Whether a file with a changed size or mtime needs no captioning: unreadable (stored as failed), or
        only touched (`_touched`). Read only when it has an indexed row: any other file's content is new."""
        row = self.known.get(str(p))
        if not (row and row[3] and row[4]) or self.recaption:
            return False
        sha = self._hash(p, size, mtime_ns)
        return sha is None or self._touched(p, size, mtime_ns, sha)

    def _hash(self, p: Path, size: int, mtime_ns: int) -> str | None:
        """The file's sha256, read in chunks (videos can be large); None when unreadable, stored as failed."""
        try:
            with open(p, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            self._fail(p, f"{p}: {e.strerror or e}", stored=(size, mtime_ns, None))
            return None

    def _touched(self, p: Path, size: int, mtime_ns: int, sha: str) -> bool:
        """Whether the file is only touched (same content as indexed): then only its size and mtime are updated."""
        row = self.known.get(str(p))
        if row and row[3] == sha and row[4] and not self.recaption:
            self.con.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, row[0]))
            self.summary["touched"] += 1
            return True
        return False

    def _loaded(self):
        """The captioner, loaded when first needed."""
        if self.captioner is None:
            from captioner.apps.api import Captioner
            self.captioner = Captioner.load(beam_size=self.beam_size)
        elif not hasattr(self.captioner, "caption_batch"):  # a loader: called once, when first needed
            self.captioner = self.captioner()
        self.model_name = self.model_name or str(self.captioner.info.get("name", "unknown"))
        return self.captioner

    def _caption(self, items: list[tuple]) -> None:
        # bytes, not paths: what gets captioned is exactly what was hashed
        results = self._loaded().caption_batch([item[4] for item in items], beam_size=self.beam_size,
                                               n_best=self.n_best)
        for (p, size, mtime_ns, sha, _), res in zip(items, results):
            if isinstance(res, Exception):
                self._fail(p, error_line(p, res), stored=(size, mtime_ns, sha), model=self.model_name)
            else:
                self._keep(p, size, mtime_ns, sha, res, self.model_name)

    def _keep(self, p: Path, size: int, mtime_ns: int, sha: str, result, model: str) -> None:
        """Store and count a captioned photo (captioned here or on a Ray worker)."""
        _store(self.con, str(p), size, mtime_ns, sha, result=result, model=model)
        self.summary["captioned"] += 1

    def _fail(self, path: Path, error: str, stored: tuple | None = None, model: str | None = None) -> None:
        """Count and list a failure; with `stored` (size, mtime_ns, sha256) its row keeps the error."""
        if stored is not None:
            _store(self.con, str(path), *stored, error=error, model=model)
        self.summary["failed"] += 1
        self.summary["errors"].append(error)


# -----------------------------------------------------------------------------
# search

def fts_query(query: str, mode: str = "or") -> str:
    """Turn free text into a safe FTS5 query: every term is quoted, so `"`, `*`, NEAR, AND/OR/NOT, `-`,
    parentheses and colons are plain words, never syntax.

    mode "or": content words joined with OR (partial matches still rank, bm25 orders them);
    "or-all": every word OR-ed, stop words included; "and": every content word required.
    """
    if mode not in ("or", "or-all", "and"):
        raise ValueError(f"unknown search mode {mode!r} (expected 'or', 'or-all' or 'and')")
    terms = list(dict.fromkeys(words(query)))
    if mode != "or-all":
        terms = [t for t in terms if t not in STOP_WORDS] or terms  # a query of only stop words keeps them
    quoted = ['"' + t.replace('"', '""') + '"' for t in terms]
    return (" AND " if mode == "and" else " OR ").join(quoted)


def _matching_caption(query: str, captions: list[str]) -> str:
    """The caption (best first on ties) sharing the most content words with the query, for display."""
    want = {lemma(w) for w in words(query) if w not in STOP_WORDS}
    return max(captions, key=lambda c: len(want & {lemma(w) for w in words(c)}))


# A photo's text has rowid images.id; a scene's has -scenes.id and takes its path from the video's row.
_RANK_SQL = """SELECT coalesce(i.path, v.path) AS file, -bm25(images_fts, ?, ?, ?) AS score,
                      coalesce(i.caption, s.caption), i.nbest, coalesce(i.tags, s.tags),
                      s.model_caption, s.start_s, s.end_s
               FROM images_fts
               LEFT JOIN images i ON i.id = images_fts.rowid
               LEFT JOIN scenes s ON s.id = -images_fts.rowid
               LEFT JOIN images v ON v.id = s.image_id
               WHERE images_fts MATCH ? AND file IS NOT NULL
               ORDER BY score DESC, file, s.start_s LIMIT ?"""


def search(db_path, query: str, limit: int = 10, *, mode: str = "or", weights: tuple = WEIGHTS) -> list[dict]:
    """Rank the library's images and video scenes for a free-text query with FTS5 bm25.

    Returns best first: {"path", "score" (higher is better), "caption" (the image's best caption, or the
    scene's description), "matched" (its n-best caption closest to the query), "tags"}; a video scene also
    has "start" and "end" (seconds). An empty or punctuation-only query returns [].
    """
    match = fts_query(query, mode)
    if not match or limit <= 0:
        return []
    with closing(_open_readonly(db_path)) as con:
        rows = con.execute(_RANK_SQL, (*weights, match, int(limit))).fetchall()
    results = []
    for path, score, caption, alternatives_json, tag_json, model_caption, start, end in rows:
        captions = ([a["caption"] for a in json.loads(alternatives_json)] if alternatives_json
                    else [c for c in (caption, model_caption) if c])
        hit = {"path": path, "score": float(score), "caption": caption,
               "matched": _matching_caption(query, captions), "tags": json.loads(tag_json or "[]")}
        if start is not None:
            hit.update(start=start, end=end)
        results.append(hit)
    return results


def rank_many(db_path, queries: list[str], limit: int = -1, *, mode: str = "or",
              weights: tuple = WEIGHTS) -> list[list[str]]:
    """The ranked paths for each of many queries over one connection (what benchmarks need; -1 = all)."""
    with closing(_open_readonly(db_path)) as con:
        out = []
        for q in queries:
            match = fts_query(q, mode)
            out.append([r[0] for r in con.execute(_RANK_SQL, (*weights, match, limit))] if match else [])
        return out


def tags(db_path) -> list[tuple[str, int]]:
    """Every tag in the library with the number of images carrying it, most common first."""
    with closing(_open_readonly(db_path)) as con:
        return [(t, n) for t, n in con.execute(
            "SELECT tag, COUNT(*) AS n FROM tags GROUP BY tag ORDER BY n DESC, tag")]


def failures(db_path) -> list[tuple[str, str]]:
    """(path, error) of every file in the library that could not be captioned."""
    with closing(_open_readonly(db_path)) as con:
        return list(con.execute("SELECT path, error FROM images WHERE error IS NOT NULL ORDER BY path"))
