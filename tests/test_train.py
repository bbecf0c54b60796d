"""Training: a tiny model overfits real captions, resume is exact, DDP runs, checkpoints are safe."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.config import Config
from captioner.data.datasets import load_prepared
from captioner.decode import greedy
from captioner.features.store import FeatureStore
from captioner.train import train

TINY = dict(embed_dim=64, project_dim=64, attention_dim=32, decoder_dim=64, dropout=0.0, batch_size=2,
            lr=1e-2, warmup_steps=5, weight_decay=0.0, patience=100, num_workers=0)


def one_caption_each(workdir, tmp_path):
    """A copy of the tiny dataset that keeps one caption per image, so memorising it is possible."""
    work = tmp_path / "one"
    shutil.copytree(workdir, work)
    lines = []
    for line in (work / "dataset.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec["captions"], rec["tokens"] = rec["captions"][:1], rec["tokens"][:1]
        lines.append(json.dumps(rec))
    (work / "dataset.jsonl").write_text("\n".join(lines) + "\n")
    return work


def test_tiny_model_overfits_real_captions(tiny_workdir, tmp_path):
    tiny_workdir = one_caption_each(tiny_workdir, tmp_path)
    config = Config(**TINY, epochs=40, alpha_c=0.0)
    result = train(tiny_workdir, tmp_path / "run", config, progress=False)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.1 * losses[0]

    ckpt = load_checkpoint(tmp_path / "run" / "last.safetensors")
    data = load_prepared(tiny_workdir)
    store = FeatureStore.open(tiny_workdir, "lite2")
    ids = [r.image_id for r in data.split("train")]
    caps = greedy(ckpt.model, ckpt.vocab, torch.from_numpy(store.get(ids)), max_len=30)
    known = {" ".join(t) for i in ids for t in data.tokens[i]}
    assert sum(c.text in known for c in caps) >= len(ids) // 2  # reproduces training captions

    run = tmp_path / "run"
    for name in ("log.csv", "curves.png", "config.json", "best.safetensors", "state.safetensors"):
        assert (run / name).is_file(), name


def _train_cmd(work, out, extra=()):
    code = ("import sys; from captioner.config import Config; from captioner.train import train; "
            f"train(sys.argv[1], sys.argv[2], Config(**{TINY!r}, epochs=3, seed=7), resume=True, "
            "progress=False, stop_after_steps=int(sys.argv[3]) if len(sys.argv) > 3 else None)")
    return [sys.executable, "-c", code, str(work), str(out), *extra]


def test_killed_and_resumed_run_ends_with_the_same_weights(tiny_workdir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(tiny_workdir, tmp_path / "straight"), check=True, env=env)
    # 3 images per epoch at batch 4 -> 3 steps an epoch: die in the middle of epoch 2, like kill -9
    died = subprocess.run(_train_cmd(tiny_workdir, tmp_path / "resumed", ["5"]), env=env)
    assert died.returncode == 3
    subprocess.run(_train_cmd(tiny_workdir, tmp_path / "resumed"), check=True, env=env)
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ddp_two_processes_gloo(tiny_workdir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    code = ("import sys; from captioner.config import Config; from captioner.train import train; "
            f"train(sys.argv[1], sys.argv[2], Config(**{TINY!r}, epochs=6), progress=False)")
    script = tmp_path / "run_ddp.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tiny_workdir),
                    str(tmp_path / "ddp")], check=True, env=env, timeout=600)
    single = train(tiny_workdir, tmp_path / "single", Config(**TINY, epochs=6), progress=False)
    ddp_hist = [float(x.split(",")[2]) for x in (tmp_path / "ddp" / "log.csv").read_text().splitlines()[1:]]
    single_hist = [h["train_loss"] for h in single["history"]]
    assert len(ddp_hist) == 6
    assert ddp_hist[-1] < 0.8 * ddp_hist[0]  # learns, like the single process
    assert ddp_hist[-1] == pytest.approx(single_hist[-1], rel=0.35)


def test_checkpoint_round_trip_and_refusals(tiny_workdir, tmp_path):
    data = load_prepared(tiny_workdir)
    from captioner.model import ShowAttendTell
    config = Config(**TINY, label_smoothing=0.1)
    model = ShowAttendTell(config, len(data.vocab))
    save_checkpoint(tmp_path / "m.safetensors", model, data.vocab, config, {"epoch": 3})
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.config == config and ckpt.vocab == data.vocab and ckpt.meta == {"epoch": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v)

    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="model.pt: not a safetensors checkpoint.*pickle"):
        load_checkpoint(pickled)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((tmp_path / "m.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_checkpoint(broken)
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")
