"""Conditional faces (issue #12): labels in the Inject block and D's projection head, labels from UTKFace names and
class folders, conditional training and resume, and the CLI (train --condition, generate --age/--grid, age, inspect)
with its one-line errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from progan import checkpoint, labels
from progan.config import TrainConfig
from progan.errors import ProganError
from progan.facedata import FaceData, ImageBank
from progan.gantrain import N_FIXED, Trainer
from progan.networks import Discriminator, Generator

COND = ("age", "gender", "race")


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(size=16, g_channels=(16, 16, 8), d_channels=(16, 16, 8), inject_channels=4, latent_dim=16, batch=8,
                fade_images=32, stable_images=16, ema_half_life=64, label_dim=8, condition=COND,
                age_range=(1, 90))
    return TrainConfig(**{**base, **kw})


# ===================================================================================================== networks


def test_inject_with_labels_keeps_shapes_at_every_level():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    G, D = Generator(cfg), Discriminator(cfg)
    z = torch.randn(5, cfg.latent_dim)
    y = torch.tensor([[20.0, 0, 1], [70.0, 1, 4], [3.0, 0, 0], [45.5, 1, 2], [90.0, 0, 3]])
    v = G.inject.vector(z, y)
    assert v.shape == (5, cfg.inject_channels + cfg.label_dim)
    assert G.inject.expand(v, 8).shape == (5, G.inject.channels, 8, 8)
    for level in range(cfg.levels):
        for alpha in (0.5, 1.0):
            img = G(z, level, alpha, labels=y)
            assert img.shape == (5, 3, cfg.resolution(level), cfg.resolution(level))
            assert D(img, level, alpha, labels=y).shape == (5,)


def test_labels_steer_the_generator_and_the_same_label_repeats():
    cfg = tiny_cfg()
    torch.manual_seed(1)
    G = Generator(cfg).eval()
    z = torch.randn(1, cfg.latent_dim).expand(2, -1)
    with torch.no_grad():
        for a, b in ([20.0, 0, 1], [70.0, 0, 1]), ([20.0, 0, 1], [20.0, 1, 1]), ([20.0, 0, 1], [20.0, 0, 3]):
            out = G(z, labels=torch.tensor([a, b]))
            assert (out[0] - out[1]).abs().max() > 1e-3, (a, b)
        same = G(z, labels=torch.tensor([[33.0, 1, 2], [33.0, 1, 2]]))
        # equal up to float rounding: torch >= 2.14 may compute two rows of one batch along different kernel paths
        torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-5)
        # Age is continuous and smooth: a year apart changes the image less than fifty years apart.
        ages = G(z[:1].expand(3, -1), labels=torch.tensor([[30.0, 0, 0], [31.0, 0, 0], [80.0, 0, 0]]))
        assert (ages[0] - ages[1]).abs().mean() < (ages[0] - ages[2]).abs().mean()


def test_discriminator_projection_scores_pairs():
    cfg = tiny_cfg()
    torch.manual_seed(2)
    D = Discriminator(cfg)
    img = torch.rand(4, 3, 16, 16) * 2 - 1
    y1 = torch.tensor([[20.0, 0, 1]] * 4)
    y2 = torch.tensor([[70.0, 1, 3]] * 4)
    s1, s2 = D(img, labels=y1), D(img, labels=y2)
    assert s1.shape == (4,) and not torch.allclose(s1, s2)
    with pytest.raises(ValueError, match="labels must be N x 3"):
        D(img)
    with pytest.raises(ValueError, match="unconditional"):
        Discriminator(tiny_cfg(condition=(), age_range=()))(img, labels=y1)


def test_unconditional_networks_have_no_label_parameters():
    cfg = tiny_cfg(condition=(), age_range=())
    torch.manual_seed(3)
    g = Generator(cfg).state_dict()
    torch.manual_seed(3)
    gc = Generator(tiny_cfg()).state_dict()
    assert not any("labels" in k for k in g) and any("inject.labels" in k for k in gc)
    assert not any("project" in k for k in Discriminator(cfg).state_dict())
    # The conditional generator adds parameters only inside the Inject block; the latent image is created first
    # from the same RNG, so it is identical.
    assert torch.equal(g["latent_image.weight"], gc["latent_image.weight"])


# ===================================================================================================== label space


def test_parse_condition_and_config_round_trip():
    assert labels.parse_condition("race, AGE") == ("age", "race")
    assert labels.parse_condition("folders") == ("folders",)
    assert labels.parse_condition("none") == ()
    for bad, why in (("age,height", "unknown label 'height'"), ("folders,age", "cannot be combined"),
                     ("age,age", "twice")):
        with pytest.raises(ProganError, match=why):
            labels.parse_condition(bad)
    cfg = tiny_cfg(condition=("folders",), classes=("b", "a"), age_range=())
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ProganError, match="only used with condition 'folders'"):
        tiny_cfg(classes=("a", "b"))


def _face_data(names: list[str]) -> FaceData:
    from progan.facedata import _labels_for

    n = len(names)
    return FaceData(images=np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3),
                    names=names, labels=_labels_for(names), root="x")


def test_utkface_labels_feed_conditioning_and_misnamed_files_are_skipped(capsys):
    names = ["25_0_2_20170116.jpg.chip.jpg", "bad_name.jpg", "3_1_4_2017.jpg.chip.jpg", "61_1_0_x.jpg",
             "200_0_0_toold.jpg", "40_2_1_badgender.jpg", "sub/81_0_3_y.jpg"]
    cfg = TrainConfig(size=16, condition=COND)
    data, cfg2, values = labels.prepare(_face_data(names), cfg, "faces/")
    assert "skipped 3 of 7 images" in capsys.readouterr().err
    assert data.names == ["25_0_2_20170116.jpg.chip.jpg", "3_1_4_2017.jpg.chip.jpg", "61_1_0_x.jpg",
                          "sub/81_0_3_y.jpg"]
    assert values.dtype == np.float32 and values.tolist() == [[25, 0, 2], [3, 1, 4], [61, 1, 0], [81, 0, 3]]
    assert data.images[:, 0, 0, 0].tolist() == [0, 2, 3, 6]          # the images that go with the kept names
    assert cfg2.age_range == (3, 81) and cfg2.condition == COND
    # One label alone: columns follow cfg.condition.
    _, _, race = labels.prepare(_face_data(names), TrainConfig(size=16, condition=("race",)), "faces/")
    assert race[:, 0].tolist() == [2, 4, 0, 3]
    with pytest.raises(ProganError, match="needs UTKFace file names"):
        labels.prepare(_face_data(["a.jpg", "b.jpg"]), cfg, "plain/")


def test_folder_classes_are_sorted_and_stable(tmp_path, capsys):
    names = ["zebra/1.png", "cats/2.png", "dogs/x/3.png", "top.png", "cats/4.png"]
    classes, idx = labels.folder_classes(names)
    assert classes == ("cats", "dogs", "zebra") and idx.tolist() == [2, 0, 1, -1, 0]
    cfg = TrainConfig(size=16, condition=("folders",))
    data, cfg2, values = labels.prepare(_face_data(names), cfg, "tree/")
    assert "skipped 1 of 5 images outside a class subfolder" in capsys.readouterr().err
    assert cfg2.classes == classes and values[:, 0].tolist() == [2, 0, 1, 0]
    with pytest.raises(ProganError, match="changed since the run started"):
        labels.prepare(_face_data(names), TrainConfig(size=16, condition=("folders",), classes=("a", "b")), "t/")
    with pytest.raises(ProganError, match="at least 2 subfolders"):
        labels.prepare(_face_data(["a.png", "b.png"]), cfg, "flat/")


def test_user_values_by_name_or_index_and_errors():
    cfg = tiny_cfg()
    y = labels.build(cfg, {"age": 70, "gender": "Female", "race": "3"}, n=3, seed=1)
    assert y.tolist() == [[70.0, 1.0, 3.0]] * 3
    partial = labels.build(cfg, {"gender": 0}, n=400, seed=2)
    assert (partial[:, 1] == 0).all()
    assert set(partial[:, 2].tolist()) == {0, 1, 2, 3, 4}                  # unspecified labels vary over the space
    assert 1 <= partial[:, 0].min() and partial[:, 0].max() <= 90
    assert torch.equal(labels.build(cfg, None, n=5, seed=9), labels.build(cfg, None, n=300, seed=9)[:5])
    for values, why in (({"age": 95}, "outside the trained range 1..90"), ({"gender": "x"}, "unknown gender 'x'"),
                        ({"race": 5}, "unknown race '5'"), ({"class": "a"}, "--class is not a label"),
                        ({"age": "old"}, "number of years")):
        with pytest.raises(ProganError, match=why):
            labels.build(cfg, values)
    with pytest.raises(ProganError, match="--age needs a conditional run"):
        labels.build(tiny_cfg(condition=(), age_range=()), {"age": 30})
    folders = tiny_cfg(condition=("folders",), classes=("cats", "dogs"), age_range=())
    assert labels.build(folders, {"class": "dogs"}).tolist() == [[1.0]]
    assert labels.build(folders, {"class": 0}).tolist() == [[0.0]]


def test_fixed_video_labels_spread_over_the_label_space():
    y = labels.fixed_labels(tiny_cfg(), N_FIXED)
    assert y.shape == (N_FIXED, 3)
    assert y[:, 0].min() == 1 and y[:, 0].max() == 90 and len(set(y[:, 0].tolist())) == 8
    assert set(y[:, 1].tolist()) == {0, 1} and set(y[:, 2].tolist()) == {0, 1, 2, 3, 4}


# ===================================================================================================== training


def _labelled_bank(n: int = 24, size: int = 16) -> ImageBank:
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    y = np.stack([rng.integers(1, 91, n), rng.integers(0, 2, n), rng.integers(0, 5, n)], 1).astype(np.float32)
    return ImageBank(imgs, labels=y)


def test_conditional_trainer_uses_real_labels_and_resumes_bit_identically():
    cfg = tiny_cfg(noise_high=-1.0, noise_low=-2.0, noise_step=0.01)
    bank = _labelled_bank()
    a = Trainer(cfg, bank)
    seen = []
    a.G.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["labels"].clone()), with_kwargs=True)
    first = a.real_labels()
    a.step()
    assert torch.equal(seen[0], first) and torch.equal(first, bank.labels[a._epoch_order(24, 0, cfg.seed)[:8]])
    for _ in range(3):
        a.step()
    state = copy.deepcopy(a.state_dict())
    assert torch.equal(state["fixed_labels"], labels.fixed_labels(cfg, N_FIXED))
    b = Trainer(cfg, bank)
    b.load_state_dict(state)
    c = Trainer(cfg, bank)
    for _ in range(4):
        c.step()
    for t in (a, b):
        for _ in range(3):
            t.step()
    for _ in range(3):
        c.step()
    for name in ("G", "D", "G_ema"):
        for k, v in getattr(b, name).state_dict().items():
            assert torch.equal(v, getattr(c, name).state_dict()[k]), f"{name}.{k}"
    assert torch.equal(b.render_fixed(), c.render_fixed())
    with pytest.raises(ValueError, match="ImageBank with labels"):
        Trainer(cfg, ImageBank(np.zeros((8, 16, 16, 3), np.uint8)))


# ===================================================================================================== CLI

N_IMAGES, N_BAD, SIZE, BATCH = 96, 3, 16, 8
TRAIN = ["--size", str(SIZE), "--batch", str(BATCH), "--fade-images", "32", "--stable-images", "32",
         "--video-every", "4", "--log-every", "4", "--no-progress",
         "--holdout", "0"]  # these tests count labelled images; the held-out split has its own tests


def _write_utk(folder: Path, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Tiny images with UTKFace names; colours follow the labels so there is something to learn."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        age, g, r = int(rng.integers(2, 81)), int(rng.integers(0, 2)), int(rng.integers(0, 5))
        img = np.empty((SIZE, SIZE, 3))
        img[..., 0], img[..., 1], img[..., 2] = age * 3, g * 200 + 20, r * 50
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{age}_{g}_{r}_2017{i:05d}.jpg.chip.jpg")
        out.append((age, g, r))
    return out


class Cli:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "PROGAN_CACHE": str(root / "cache"), "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1"}
        self.env.pop("PROGAN_DEBUG", None)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "progan", *map(str, args)], capture_output=True, text=True,
                              cwd=self.root, env=self.env, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("progan: error:") and sum(l.startswith("progan: error:") for l in lines) == 1, \
        proc.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


def _error(capsys, args: list, *words: str) -> str:
    """The CLI's entry point in this process (cheaper than a subprocess per bad input): one line, non-zero exit."""
    from progan.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return _one_line_error(subprocess.CompletedProcess(args, e.value.code, "", err), *words)


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
    """One 2-epoch conditional run on UTKFace-named images (plus misnamed files), shared by the CLI tests."""
    root = tmp_path_factory.mktemp("cond")
    cli = Cli(root)
    truth = _write_utk(root / "utk", N_IMAGES)
    for i in range(N_BAD):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "utk" / f"IMG_{i:04d}.jpg")
    proc = cli("train", root / "utk", "--out", root / "run", "--epochs", "2", "--condition", "race,age,gender",
               *TRAIN)
    assert proc.returncode == 0, proc.stderr
    return cli, root, truth, proc


def test_conditional_train_saves_label_space(cond):
    cli, root, truth, proc = cond
    assert f"skipped {N_BAD} of {N_IMAGES + N_BAD} images without UTKFace labels" in proc.stderr
    cfg = TrainConfig.load(root / "run" / "config.json")
    ages = [a for a, _, _ in truth]
    assert cfg.condition == COND and cfg.age_range == (min(ages), max(ages)) and cfg.classes == ()
    state = checkpoint.load(checkpoint.latest(root / "run"))
    assert state["nimg"] == 2 * N_IMAGES                   # the misnamed images were not trained on
    assert TrainConfig.from_dict(state["config"]) == cfg
    assert state["fixed_labels"].shape == (N_FIXED, 3) and len(set(state["fixed_labels"][:, 0].tolist())) == 8
    from progan.visualization import read_video

    assert read_video(root / "run" / "training.mkv")[0] == 2 * N_IMAGES // BATCH // 4

    info = cli("inspect", root / "run")
    assert info.returncode == 0, info.stderr
    assert f"age          {min(ages)}..{max(ages)} years" in info.stdout
    assert "gender       0 male, 1 female" in info.stdout
    assert "race         0 White, 1 Black, 2 Asian, 3 Indian, 4 Others" in info.stdout


def test_generate_with_labels_and_label_grid(cond, capsys):
    cli, root, _, _ = cond
    for seed in (3, 3):
        proc = cli("generate", root / "run", "--n", 4, "--age", 70, "--gender", "female", "--race", "Asian",
                   "--seed", seed, "--out", root / f"old-{seed}.png")
        assert proc.returncode == 0, proc.stderr
    young = cli("generate", root / "run", "--n", 4, "--age", 5, "--gender", "female", "--race", "Asian", "--seed", 3,
                "--out", root / "young.png")
    assert young.returncode == 0, young.stderr
    old, again, yng = (np.asarray(Image.open(root / p)) for p in ("old-3.png", "old-3.png", "young.png"))
    assert old.shape == (2 * SIZE, 2 * SIZE, 3) and np.array_equal(old, again) and not np.array_equal(old, yng)

    proc = cli("generate", root / "run", "--grid", "age=5:65:4,race", "--seed", 4, "--out", root / "table.png")
    assert proc.returncode == 0, proc.stderr
    assert "columns: 5, 25, 45, 65; rows: White, Black, Asian, Indian, Others" in proc.stderr
    table = np.asarray(Image.open(root / "table.png"))
    assert table.shape == (5 * SIZE, 4 * SIZE, 3)
    cells = table.reshape(5, SIZE, 4, SIZE, 3).transpose(0, 2, 1, 3, 4)
    assert not np.array_equal(cells[0, 0], cells[0, 3]) and not np.array_equal(cells[0, 0], cells[4, 0])

    for args, words in (
        (["--age", 200], ["age 200 is outside the trained range"]),
        (["--gender", "alien"], ["unknown gender 'alien'", "0 male, 1 female"]),
        (["--class", "cats"], ["--class is not a label"]),
        (["--grid", "height"], ["--grid: unknown label 'height'"]),
    ):
        _error(capsys, ["generate", root / "run", "--out", root / "x.png", *args], *words)


def test_age_video_sweeps_one_face(cond, capsys):
    cli, root, truth, _ = cond
    from progan.visualization import read_frames, read_video

    proc = cli("age", root / "run", "--seed", 7, "--from", 10, "--to", 70, "--seconds", 1, "--fps", 12,
               "--out", root / "aging.mp4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    n, w, h = read_video(root / "aging.mp4")
    assert n == 12 and w % 2 == 0 and h % 2 == 0
    frames = read_frames(root / "aging.mp4")
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 0.5   # the face changes with age
    # A grid of several faces, and a projected latent file.
    proc = cli("age", root / "run", "--n", 4, "--seconds", 0.5, "--fps", 10, "--gender", "male",
               "--out", root / "grid.mp4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    n4, w4, h4 = read_video(root / "grid.mp4")
    assert n4 == 5 and w4 == 2 * w
    z = np.random.default_rng(0).standard_normal((1, 100)).astype(np.float32)
    np.savez(root / "me.npz", z=z, labels=np.array([[30, 1, 2]], np.float32), condition=np.array(COND),
             run=np.array(str(root / "run")))
    proc = cli("age", root / "run", "--latent", root / "me.npz", "--seconds", 0.5, "--fps", 8,
               "--out", root / "me.mp4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert read_video(root / "me.mp4")[0] == 4
    np.savez(root / "wrong.npz", z=np.zeros((1, 7), np.float32))
    _error(capsys, ["age", root / "run", "--latent", root / "wrong.npz", "--out", root / "w.mp4"], "1 x 100")
    _error(capsys, ["age", root / "run", "--from", 10, "--to", 200, "--out", root / "w.mp4"],
           "--to 200 is outside the trained age range")


def test_resume_conditional_and_refuse_a_changed_condition(cond, tmp_path, capsys):
    cli, root, _, _ = cond
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    proc = cli("train", root / "utk", "--out", run, "--epochs", "3", *TRAIN)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr and "done: 3 epochs" in proc.stderr
    state = checkpoint.load(checkpoint.latest(run))
    assert TrainConfig.from_dict(state["config"]).condition == COND and state["nimg"] == 3 * N_IMAGES
    _error(capsys, ["train", root / "utk", "--out", run, "--epochs", "4", "--condition", "age", *TRAIN],
           "trained with condition=age,gender,race", "condition=age was asked for")
    _error(capsys, ["train", root / "utk", "--out", run, "--epochs", "4", "--condition", "none", *TRAIN],
           "condition=none was asked for")


def test_folder_classes_run_and_bad_inputs(tmp_path, capsys):
    cli = Cli(tmp_path)
    rng = np.random.default_rng(1)
    for k, cls in enumerate(("zebra", "cats", "dogs")):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(8):
            img = np.clip(rng.normal(60 + 60 * k, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "tree" / cls / f"{i}.png")
    proc = cli("train", tmp_path / "tree", "--out", tmp_path / "run", "--condition", "folders", "--max-steps", 2,
               *TRAIN)
    assert proc.returncode == 0, proc.stderr
    cfg = TrainConfig.load(tmp_path / "run" / "config.json")
    assert cfg.condition == ("folders",) and cfg.classes == ("cats", "dogs", "zebra")
    state = checkpoint.load(checkpoint.latest(tmp_path / "run"))
    assert tuple(state["config"]["classes"]) == ("cats", "dogs", "zebra")
    assert "class        0 cats, 1 dogs, 2 zebra" in cli("inspect", tmp_path / "run").stdout
    proc = cli("generate", tmp_path / "run", "--class", "dogs", "--n", 2, "--out", tmp_path / "dogs.png")
    assert proc.returncode == 0, proc.stderr
    proc = cli("generate", tmp_path / "run", "--grid", "class", "--out", tmp_path / "classes.png")
    assert proc.returncode == 0 and "columns: cats, dogs, zebra" in proc.stderr, proc.stderr
    _error(capsys, ["age", tmp_path / "run", "--out", tmp_path / "a.mp4"], "not trained with age")
    _error(capsys, ["generate", tmp_path / "run", "--class", "birds", "--out", tmp_path / "b.png"],
           "unknown class 'birds'", "0 cats")

    # Folders without the labels asked for: no UTKFace names, no class subfolders.
    cache = ["--cache-dir", tmp_path / "cache"]
    _error(capsys, ["train", tmp_path / "tree", "--out", tmp_path / "r2", "--condition", "age", *TRAIN, *cache],
           "--condition age needs UTKFace file names")
    _error(capsys, ["train", tmp_path / "tree" / "cats", "--out", tmp_path / "r3", "--condition", "folders", *TRAIN,
                    *cache], "needs images in at least 2 subfolders")
    _error(capsys, ["train", tmp_path / "tree", "--out", tmp_path / "r4", "--condition", "age,height", *TRAIN],
           "unknown label 'height'")

    # Labels asked of an unconditional run.
    unc = TrainConfig(size=16, g_channels=(8, 8, 8), d_channels=(8, 8, 8), latent_dim=8, inject_channels=4, batch=4)
    t = Trainer(unc, ImageBank(np.zeros((8, SIZE, SIZE, 3), np.uint8)))
    checkpoint.save(t.state_dict(), tmp_path / "plain" / "checkpoints", "epoch-0000.pt")
    _error(capsys, ["generate", tmp_path / "plain", "--age", 30, "--out", tmp_path / "p.png"],
           "--age needs a conditional run")
    _error(capsys, ["generate", tmp_path / "plain", "--grid", "age", "--out", tmp_path / "p.png"],
           "--grid needs a conditional run")
    _error(capsys, ["age", tmp_path / "plain", "--out", tmp_path / "p.mp4"], "not trained with age")
    from progan.cli import main

    capsys.readouterr()
    main(["inspect", str(tmp_path / "plain")])
    assert "labels       none (unconditional)" in capsys.readouterr().out
