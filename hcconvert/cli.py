"""The `hcconvert` command: convert (the default), inspect, eval.

`hcconvert SRC --experts R --out DIR` converts; a first argument that names no subcommand is
taken as SRC. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .clustering import LINKAGES
from .errors import UserError
from .options import DEVICES, MERGES, PROPAGATIONS, ROUTERS, ConvertOptions
from .resources import human_bytes, peak_gpu_bytes, peak_rss_bytes


class DefaultToConvert(click.Group):
    """A group whose first argument, when it is not a subcommand, is the SRC of `convert`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


def fail(message: str) -> None:
    click.echo(f"hcconvert: error: {message}", err=True)
    sys.exit(2)


def run_guarded(action):
    """Run action(); a UserError becomes one line on stderr and exit code 2."""
    try:
        return action()
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written")


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


@click.group(cls=DefaultToConvert, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Reduce the experts of a Mixture-of-Experts checkpoint (HC-SMoE), one layer at a time.

    \b
      hcconvert SRC --experts R --out DIR [OPTIONS]   (see: hcconvert convert --help)
      hcconvert inspect SRC
      hcconvert eval ORIGINAL REDUCED --text FILE
    """


@main.command()
@click.argument("src")
@click.option("--experts", "-r", type=int, required=True, help="Experts to keep per MoE layer.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output directory.")
@click.option("--calib", help="Calibration text: .jsonl / .json.gz with a 'text' field, or .txt. "
              "Default: the paper's C4 shard from the Hub.")
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--linkage", type=click.Choice(LINKAGES), default="average", show_default=True)
@click.option("--merge", type=click.Choice(MERGES), default="freq", show_default=True)
@click.option("--router", type=click.Choice(ROUTERS), default="lse-fit", show_default=True)
@click.option("--propagate", type=click.Choice(PROPAGATIONS), default="original",
              show_default=True, help="Next layer's input: the original or the merged output.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--revision", help="Hub revision of SRC.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit; reads headers only.")
@click.option("--push-to-hub", "push_repo", metavar="REPO", help="Upload the result.")
@click.option("--private", is_flag=True, help="With --push-to-hub: a private repo.")
def convert(src, out, overwrite, dry_run, push_repo, private, max_shard_size, **kwargs) -> None:
    """Convert SRC (a directory or a Hub repo id) into a checkpoint with fewer experts."""
    def action():
        try:
            shard_bytes = parse_size(max_shard_size)
        except ValueError:
            raise UserError(f"--max-shard-size {max_shard_size!r} is not a size like 5GB") from None
        options = ConvertOptions(max_shard_size=shard_bytes, **kwargs)
        validate_numbers(options)
        if dry_run:
            from .report import print_plan

            return print_plan(src, options)
        if out is None:
            raise UserError("--out is required (or pass --dry-run)")
        from .convert import convert as run_conversion
        from .report import print_summary

        conversion = run_conversion(src, out, options, overwrite=overwrite)
        print_summary(conversion)
        if push_repo:
            from .hub import push

            push(out, push_repo, private)

    run_guarded(action)


def validate_numbers(options: ConvertOptions) -> None:
    for name in ("experts", "calib_samples", "seq_len", "max_shard_size"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


@main.command()
@click.argument("src")
@click.option("--revision", help="Hub revision of SRC.")
def inspect(src, revision) -> None:
    """Describe SRC without reading tensor data."""
    from .report import print_inspection

    run_guarded(lambda: print_inspection(src, revision))


@main.command("eval")
@click.argument("original")
@click.argument("reduced")
@click.option("--text", required=True, type=click.Path(path_type=Path),
              help="Held-out text (.txt, .jsonl, .json.gz).")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--samples", type=int, default=64, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def evaluate_command(original, reduced, text, seq_len, samples, device) -> None:
    """Perplexity of ORIGINAL and REDUCED on TEXT, and KL(original ‖ reduced)."""
    from .evaluate import evaluate

    def action():
        result = evaluate(original, reduced, text, seq_len, samples, device)
        click.echo(f"tokens               {result.tokens}")
        click.echo(f"perplexity original  {result.perplexity_original:.4f}")
        click.echo(f"perplexity reduced   {result.perplexity_reduced:.4f}")
        click.echo(f"KL(original‖reduced) {result.kl:.5f} nats/token")
        click.echo(f"peak host memory     {human_bytes(peak_rss_bytes())}")
        gpu = peak_gpu_bytes()
        if gpu is not None:
            click.echo(f"peak GPU memory      {human_bytes(gpu)}")

    run_guarded(action)
