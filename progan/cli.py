"""The `progan` command line (also `python -m progan`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from progan.config import TrainConfig
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
                   "fade_images", "stable_images", "lr_g", "lr_d", "ema_half_life", "latent_dim")


@cli.command()
@click.argument("images", metavar="DIR")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: runs/<name of DIR>]. Resumes when it holds a checkpoint.")
@click.option("--size", type=int, default=None,
              help="Final resolution, base*2^k with a small base: 32, 64, 128, 160, 256 ..." + _d("size"))
@click.option("--preset", type=click.Choice(["default", "seed2019"]), default="default", show_default=True,
              help="Named configuration; seed2019 = the seed report's own settings (160 px, G 128 / D 32 channels).")
@click.option("--epochs", type=int, default=None, help="Passes over the training images." + _d("epochs"))
@click.option("--batch", type=int, default=None, help="Minibatch size." + _d("batch"))
@click.option("--diversity", type=float, default=None,
              help="Strength of the seed's diversity gradient; 0 turns diversity learning off." + _d("diversity"))
@click.option("--seed", type=int, default=None, help="Seed for weights, data order and latents." + _d("seed"))
@click.option("--video-every", type=int, default=None, help="Steps between training.mkv frames." + _d("video_every"))
@click.option("--log-every", type=int, default=None, help="Steps between log.jsonl lines." + _d("log_every"))
@click.option("--keep", type=int, default=None, help="Keep only the N newest checkpoints (0 = all)." + _d("keep"))
@click.option("--fade-images", type=int, default=None, help="Images per fade-in phase." + _d("fade_images"))
@click.option("--stable-images", type=int, default=None, help="Images per stable phase." + _d("stable_images"))
@click.option("--lr-g", type=float, default=None, help="Generator learning rate." + _d("lr_g"))
@click.option("--lr-d", type=float, default=None, help="Discriminator learning rate." + _d("lr_d"))
@click.option("--ema-half-life", type=int, default=None, help="EMA generator half-life in images." + _d("ema_half_life"))
@click.option("--latent-dim", type=int, default=None, help="Latent dimension." + _d("latent_dim"))
@click.option("--fresh", is_flag=True, help="Ignore existing checkpoints: move the old run folder aside and start over.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where decoded images are cached [default: $PROGAN_CACHE or ~/.cache/progan].")
@click.option("--allow-upscale", is_flag=True, help="Accept images smaller than --size (they are upscaled).")
@click.option("--max-steps", type=int, default=None, hidden=True, help="Stop after N steps (tests).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
def train(images: str, out: str | None, preset: str, fresh: bool, device: str,
          cache_dir: str | None, allow_upscale: bool, max_steps: int | None, no_progress: bool, **options) -> None:
    """Train on the images in DIR (any folder tree of jpg/png/webp/bmp), or on the built-in 'digits' set.

    Writes OUT/training.mkv, OUT/config.json, OUT/log.jsonl and OUT/checkpoints/epoch-NNNN.pt (+ latest).
    Running the same command again resumes; Ctrl-C saves a checkpoint and exits with 130.
    """
    from progan.config import PRESETS
    from progan.run import train as run_train

    explicit = {k for k in _CONFIG_OPTIONS if options[k] is not None}
    requested = {**PRESETS[preset], **{k: options[k] for k in _CONFIG_OPTIONS if options[k] is not None}}
    if preset != "default":
        explicit |= set(PRESETS[preset])
    run_dir = Path(out) if out else Path("runs") / (Path(images).resolve().name or "run")
    result = run_train(images, run_dir, requested, explicit, fresh=fresh, device=device, cache_dir=cache_dir,
                       allow_upscale=allow_upscale, progress=not no_progress, max_steps=max_steps)
    if result.signal is not None:
        click.echo(f"stopped by signal; resume with the same command (checkpoint {result.checkpoint})", err=True)
        sys.exit(128 + result.signal)
    click.echo(f"done: {result.epochs_done} epochs, {result.nimg:,} images shown; run folder {result.run_dir}",
               err=True)


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
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
