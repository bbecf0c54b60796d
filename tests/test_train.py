"""Training: a tiny model overfits real captions, resume is exact, DDP runs, checkpoints are safe."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from safetensors.torch import load_file

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.config import Config
from captioner.data.datasets import load_prepared
from captioner.decode import BAD_ENDINGS, decode, greedy, sample
from captioner.features.store import FeatureStore
from captioner.train import Reward, train

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


def _train_cmd(work, out, extra=(), init=None, **changes):
    code = ("import os, sys; from captioner.config import Config; from captioner.train import train; "
            f"train(sys.argv[1], sys.argv[2], Config(**{TINY!r}, epochs=3, seed=7).replace(**{changes!r}), "
            f"init={str(init) if init else None!r}, resume=os.path.exists(sys.argv[2]), "
            "progress=False, stop_after_steps=int(sys.argv[3]) if len(sys.argv) > 3 else None)")
    return [sys.executable, "-c", code, str(work), str(out), *extra]


def assert_killed_and_resumed_equals_straight(tmp_path, cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env)
    # 12 images per epoch at batch 2 -> 6 steps an epoch: die in the middle of epoch 2, like kill -9
    died = subprocess.run(cmd(tmp_path / "resumed", ["8"]), env=env)
    assert died.returncode == 3
    subprocess.run(cmd(tmp_path / "resumed"), check=True, env=env)
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_and_resumed_run_ends_with_the_same_weights(tiny_workdir, tmp_path):
    assert_killed_and_resumed_equals_straight(tmp_path, lambda out, extra=(): _train_cmd(tiny_workdir, out, extra))


# --- self-critical sequence training ---------------------------------------------------------------

@pytest.fixture(scope="module")
def one_caption_workdir(tiny_workdir, tmp_path_factory):
    return one_caption_each(tiny_workdir, tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="module")
def xent_model(one_caption_workdir, tmp_path_factory):
    """A tiny, partly trained cross-entropy model for SCST to start from (float32: the SCST test's thresholds were
    set on it; bf16 training has its own test)."""
    out = tmp_path_factory.mktemp("xent")
    train(one_caption_workdir, out, Config(**TINY, epochs=6, alpha_c=0.0, precision="fp32"), progress=False)
    return out / "best.safetensors"


def test_sample_draws_allowed_words_with_gradients(tiny_workdir):
    data = load_prepared(tiny_workdir)
    store = FeatureStore.open(tiny_workdir, "lite2")
    from captioner.model import ShowAttendTell
    torch.manual_seed(0)
    model = ShowAttendTell(Config(**TINY), len(data.vocab))
    ids = [r.image_id for r in data.split("train")][:2]
    with torch.no_grad():  # make "a" and <end> likely, so "a <end>" would be common without the rule
        model.out.bias[data.vocab.end_id] = 4.0
        model.out.bias[data.vocab.stoi["a"]] = 4.0
    words, logp, mask = sample(model, data.vocab, torch.from_numpy(store.get(ids)).repeat(10, 1, 1), 3, max_len=6)
    assert words.shape == logp.shape == mask.shape and words.shape[0] == 60 and words.shape[1] <= 7
    v = data.vocab
    assert 0 < mask.sum(1).min() < 7 and (mask.sum(1) < 7).sum() > 15  # many rows end by choice
    for row, m, lp in zip(words.tolist(), mask.tolist(), logp):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (len(m) - n)  # counted steps are a prefix
        assert row[n - 1] == v.end_id and v.end_id not in row[:n - 1] and row[0] != v.end_id
        assert not {v.pad_id, v.start_id, v.unk_id} & set(row[:n])
        if n - 1 < 6:  # ended by choice, not forced at max_len: never right after "a", "of", ...
            assert v.itos[row[n - 2]] not in BAD_ENDINGS
        assert torch.all(lp[:n] <= 0) and torch.all(torch.isfinite(lp)) and torch.all(lp[n:] == 0)
    (logp * mask).sum().backward()
    assert model.out.weight.grad.abs().sum() > 0 and model.project[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("baseline,lr", [("mean", 1e-2), ("greedy", 3e-3)])
def test_scst_raises_the_cider_reward(one_caption_workdir, xent_model, tmp_path, baseline, lr):
    # one reference per image: the CIDEr-D of sampled captions has somewhere clear to climb to
    config = load_checkpoint(xent_model).config.replace(objective="scst", scst_baseline=baseline, epochs=15,
                                                        lr=lr, warmup_steps=0, scst_samples=8)
    history = train(one_caption_workdir, tmp_path / "scst", config, init=xent_model, progress=False)["history"]
    rewards = [h["train_reward"] for h in history]
    assert sum(rewards[-3:]) / 3 > 1.4 * sum(rewards[:2]) / 2, rewards
    if baseline == "greedy":  # its own baseline, not the samples' mean
        assert any(h["train_baseline"] != h["train_reward"] for h in history)
    ckpt = load_checkpoint(tmp_path / "scst" / "best.safetensors")
    assert ckpt.config.objective == "scst" and ckpt.meta["init"] == str(xent_model)


def test_reward_mix_adds_sentence_bleu4_to_cider_d():
    refs = {"a": ["a dog runs on the grass", "a brown dog is running outside"],
            "b": ["a man rides a red bike", "a person on a bicycle"], "c": ["two children play in the water"] * 2}
    texts, ids = ["a dog runs on the grass", "a man rides a bike", "a dog runs on the grass"], ["a", "b", "c"]
    cider_only, mixed = Reward(refs).scores(texts, ids), Reward(refs, bleu_weight=0.5).scores(texts, ids)
    bleu4 = Bleu(4).compute_score({str(k): refs[i] for k, i in enumerate(ids)},
                                  {str(k): [t] for k, t in enumerate(texts)}, verbose=0)[1][3]
    assert cider_only[0] > cider_only[2] > -1e-9  # CIDEr-D alone: the caption of another image earns nothing
    assert mixed == pytest.approx(cider_only + 0.5 * np.array(bleu4))
    assert bleu4[0] == pytest.approx(1.0) and bleu4[2] < 1e-6


def test_killed_and_resumed_scst_run_ends_with_the_same_weights(tiny_workdir, xent_model, tmp_path):
    assert_killed_and_resumed_equals_straight(tmp_path, lambda out, extra=(): _train_cmd(
        tiny_workdir, out, extra, init=xent_model, objective="scst", lr=1e-3))


def test_pseudo_captions_add_a_teacher_caption_to_half_the_train_photos(one_caption_workdir, xent_model, tmp_path):
    out = tmp_path / "self"
    tool = Path(__file__).resolve().parents[1] / "tools" / "pseudo_captions.py"
    subprocess.run([sys.executable, str(tool), str(xent_model), "--work", str(one_caption_workdir), "--out", str(out)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, after = load_prepared(one_caption_workdir), load_prepared(out)
    added = {r.image_id: after.tokens[r.image_id][-1] for r in after.records
             if len(after.tokens[r.image_id]) > len(before.tokens[r.image_id])}
    train_ids = {r.image_id for r in before.split("train")}
    assert set(added) <= train_ids and len(added) == len(train_ids) // 2
    assert all(after.tokens[r.image_id][:-1 if r.image_id in added else None] == before.tokens[r.image_id]
               and r.captions == b.captions for r, b in zip(after.records, before.records))
    assert all(toks and all(w in after.vocab for w in toks) for toks in added.values())
    assert after.vocab == before.vocab and len(FeatureStore.open(out, "lite2")) == len(before.records)
    train(out, tmp_path / "run", Config(**TINY, epochs=1, precision="fp32"), progress=False)  # it trains


def test_scst_refusals(tiny_workdir, xent_model, tmp_path):
    with pytest.raises(ValueError, match="--init"):
        train(tiny_workdir, tmp_path / "a", Config(**TINY, objective="scst"), progress=False)
    with pytest.raises(ValueError, match="scst_samples >= 2"):
        train(tiny_workdir, tmp_path / "b", Config(**TINY, objective="scst", scst_samples=1), init=xent_model,
              progress=False)
    other = tmp_path / "other.safetensors"
    ckpt = load_checkpoint(xent_model)
    itos = list(ckpt.vocab.itos)
    itos[4], itos[5] = itos[5], itos[4]
    save_checkpoint(other, ckpt.model, type(ckpt.vocab)(itos), ckpt.config, {})
    with pytest.raises(ValueError, match="other.safetensors: its vocabulary differs"):
        train(tiny_workdir, tmp_path / "c", Config(**TINY, objective="scst"), init=other, progress=False)


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


def test_precision_chooses_bf16_for_cross_entropy_where_native(tiny_workdir, tmp_path):
    """precision "auto": bf16 autocast on a CPU with native bf16 (cross-entropy and self-critical), else float32;
    an unknown value is refused. A bf16 run trains and its checkpoint holds float32 weights."""
    from captioner.train import use_bf16
    cpu = torch.device("cpu")
    native = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    assert use_bf16(Config(), cpu) == use_bf16(Config(objective="scst"), cpu) == native
    assert use_bf16(Config(precision="bf16", objective="scst"), cpu) and not use_bf16(Config(precision="fp32"), cpu)
    with pytest.raises(ValueError, match="precision 'fp16'"):
        use_bf16(Config(precision="fp16"), cpu)
    history = train(tiny_workdir, tmp_path / "bf16", Config(**TINY, epochs=2, precision="bf16"), progress=False)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    ckpt = load_checkpoint(tmp_path / "bf16" / "best.safetensors")
    assert ckpt.config.precision == "bf16" and ckpt.model.out.weight.dtype == torch.float32


def test_concept_input_reads_the_frozen_imagenet_classifier(tiny_workdir, tmp_path):
    """concept_input: the encoder's ImageNet classifier is copied in, stays frozen while the decoder learns to read
    its output, travels in the checkpoint, and attention maps still cover the grid alone."""
    from captioner.features.encoder import pretrained_net
    fc = pretrained_net("lite2")._fc
    history = train(tiny_workdir, tmp_path / "c", Config(**TINY, epochs=3, concept_input=True), progress=False)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    model = load_checkpoint(tmp_path / "c" / "best.safetensors").model
    assert torch.equal(model.imagenet.weight, fc.weight) and torch.equal(model.imagenet.bias, fc.bias)
    data = load_prepared(tiny_workdir)
    grids = torch.from_numpy(FeatureStore.open(tiny_workdir, "lite2").get([r.image_id for r in data.split("dev")]))
    assert model.init_state(grids)[0].shape[1] == grids.shape[1] + 1  # the concept region
    [[caption]] = decode(model, data.vocab, grids[:1], beam_size=2, max_len=12, return_attention=True)
    assert caption.attention.shape[1] == grids.shape[1]
    # the decoder depends on what the classifier says: another classifier, other word scores
    model.imagenet.weight.data = model.imagenet.weight.data.roll(1, 0)
    changed = load_checkpoint(tmp_path / "c" / "best.safetensors").model
    logits = [m.step(torch.tensor([data.vocab.start_id]), m.init_state(grids[:1]))[0] for m in (model, changed)]
    assert not torch.allclose(*logits)


def test_pyramid_adds_the_pooled_grid_as_regions_and_maps_still_cover_the_grid(tiny_workdir):
    """pyramid=k: the decoder also attends to the k x k average pooling of the grid (region 81 + i*k + j is the mean
    of block (i, j)); the attention maps and the initial state stay those of the grid."""
    from captioner.model import ShowAttendTell
    data = load_prepared(tiny_workdir)
    grids = torch.from_numpy(FeatureStore.open(tiny_workdir, "lite2").get([r.image_id for r in data.split("dev")][:2]))
    model = ShowAttendTell(Config(**TINY, pyramid=3), len(data.vocab)).eval()
    values, keys, h, c = model.init_state(grids)
    assert values.shape[1] == 81 + 9 and keys.shape[1] == 81 + 9
    block = grids.view(2, 9, 9, -1)[:, 3:6, 6:9].mean((1, 2))  # pooled region (1, 2)
    assert torch.allclose(values[:, 81 + 1 * 3 + 2], model.project(block), atol=1e-5)
    assert torch.allclose(h, torch.tanh(model.init_h(values[:, :81].mean(1))), atol=1e-6)
    [[caption]] = decode(model, data.vocab, grids[:1], beam_size=2, max_len=12, return_attention=True)
    assert caption.attention.shape[1] == 81
