"""The `hcconvert` command: convert (the default), compare, inspect, eval.

`hcconvert SRC --experts R --out DIR` converts; a first argument that names no subcommand is
taken as SRC. Bad input, a bad option value included, ends with one line on stderr and exit
code 2.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from .. import __version__
from ..errors import UserError, warnings_once
from ..methods.clustering import GROUPINGS, LINKAGES
from ..methods.features import METRICS
from ..methods.merging import MERGES
from ..methods.pruning import PRUNE_BY
from ..methods.ream import SALIENCIES, SIMILARITIES
from ..methods.router import ROUTERS
from ..pipeline.options import (
    COMPUTE_DTYPES,
    DEFAULT_SEQ_LEN,
    DEFAULT_SHARD_SIZE,
    DEFAULTS,
    DEVICES,
    DTYPES,
    PROPAGATIONS,
    ConvertOptions,
    read_recipe,
    size_option,
)
from ..pipeline.recipes import DEFAULT_COMPARISON, METHOD_NAMES, RECIPES
from ..resources import human_bytes, peak_gpu_bytes, peak_rss_bytes
from ..signals import Interrupted, signals_as_interrupts


class DefaultToConvert(click.Group):
    """A group whose first argument, when it is not a subcommand, is the SRC of `convert`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                        "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        """A subcommand's usage error (a bad --merge value, say) in one line, exit code 2."""
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            fail(err.format_message())


def fail(message: str, code: int = 2) -> None:
    click.echo(f"hcconvert: error: {message}", err=True)
    sys.exit(code)


def run_guarded(action):
    """Run action(); a UserError becomes one line on stderr and exit code 2. SIGINT, SIGTERM
    and SIGHUP unwind the same way (staging removed, lock released) and exit 128 + signal."""
    try:
        with signals_as_interrupts(), warnings_once():
            return action()
    except UserError as err:
        fail(str(err))
    except OSError as err:  # a full disk, an unwritable --out: after cleanup, one line
        fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    except KeyboardInterrupt as err:
        interrupt = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
        outcome = ("after the output was published" if interrupt.published
                   else "nothing was published")
        if interrupt.kept is not None:
            outcome += (f"; the finished layers are kept in {interrupt.kept}: run the same "
                        "command again to go on")
        elif interrupt.dropped:
            outcome += ("; the finished layers were removed (run with --resume to keep them "
                        "when stopped)")
        fail(f"interrupted by {interrupt.name}; {outcome}", 128 + interrupt.signum)


def probe_hub_if_needed(*sources: str, also: bool = False) -> None:
    """A run that will reach the Hub (a source that is no local directory, or `also`) first
    checks that it can: offline, huggingface_hub retries each request for half a minute."""
    if also or any(not Path(src).is_dir() for src in sources):
        from ..io.hub import go_offline_if_unreachable

        go_offline_if_unreachable()


@click.group(cls=DefaultToConvert, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hcconvert")
def main() -> None:
    """Reduce the experts of a Mixture-of-Experts checkpoint (HC-SMoE), one layer at a time.

    \b
      hcconvert SRC --experts R --out DIR [OPTIONS]   (see: hcconvert convert --help)
      hcconvert compare SRC --experts R --calib FILE --eval FILE [--methods a,b,c]
      hcconvert inspect SRC
      hcconvert eval ORIGINAL REDUCED --text FILE
    """


def console_main() -> None:
    """The `hcconvert` console script: `main`, then an exit without the interpreter's teardown.

    After torch and transformers are imported, the final garbage collection and module teardown
    over their ~400k objects take 0.7-0.9 s (0.03 s with os._exit) that every command would
    wait for. The atexit handlers (logging.shutdown, temporary directories' finalizers) still
    run and stdout, stderr and C's stdio are flushed; only the teardown is skipped (os._exit).
    A string exit code, a live non-daemon thread (os._exit would kill it), a failed flush or
    an exception other than SystemExit take the normal way out.
    """
    try:
        main()  # in click's standalone mode, main always ends with SystemExit
    except SystemExit as done:
        code = 0 if done.code is None else done.code
        if not isinstance(code, int) or _other_threads_alive():
            raise
        atexit._run_exitfuncs()  # run once: they are cleared, so a re-raise runs none again
        if not _flushed():
            raise
        os._exit(code)


def _other_threads_alive() -> bool:
    """Whether a non-daemon thread other than the main one runs: the normal exit waits for it."""
    return any(thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
               for thread in threading.enumerate())


def _flushed() -> bool:
    """Flush stdout and stderr, then C's stdio buffers (a C library's printf, which the normal
    exit flushes too); False if Python's cannot be (a closed pipe, a closed file)."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return False
    with contextlib.suppress(OSError, AttributeError):  # no C library to reach: nothing to do
        ctypes.CDLL(None).fflush(None)
    return True


def options_of(*decorators):
    """Several click options as one decorator, for the options commands share."""
    def apply(function):
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


# Numbers are checked by ConvertOptions itself, the same for the CLI and the Python API.
calibration_numbers = options_of(
    click.option("--text-field", default=DEFAULTS["text_field"], show_default=True,
                 help="Field of JSON lines and parquet rows that holds the text, or PROMPT+"
                 "RESPONSE for an instruction/response pair (records with chat 'messages' "
                 "instead, and pairs, are rendered with the model's chat template)."),
    click.option("--calib-samples", type=int, default=DEFAULTS["calib_samples"],
                 show_default=True, help="Calibration sequences."),
    click.option("--seq-len", type=int, help=f"Tokens per calibration sequence. Default: "
                 f"{DEFAULT_SEQ_LEN}, or the model's max_position_embeddings where shorter."),
    click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True,
                 help="Seed of the calibration sample and of random choices."))
router_option = click.option(
    "--router", type=click.Choice(ROUTERS), help="Router row of a merged expert: its most "
    "used member's, the frequency-weighted average, a least-squares fit of the members' "
    "softmax mass, or (REAM) its leader's. Default: the method's (freq-avg; ream: leader).")
device_option = click.option("--device", type=click.Choice(DEVICES), default=DEFAULTS["device"],
                             show_default=True)
compute_dtype_option = click.option(
    "--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default=DEFAULTS["compute_dtype"],
    show_default=True, help="dtype of the layers' products (auto: the checkpoint's half "
    "precision on a GPU or an AMX CPU, else float32); statistics accumulate in float32.")


# The evaluation's sequence length and count: at least 1, and far below what would exhaust
# memory before the first layer.
EVAL_NUMBER = click.IntRange(1, 1 << 20)


def size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return size_option(value, param.name)
    except UserError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.argument("src", required=False)
@click.option("--experts", "-r", type=int, help="Experts to keep per MoE layer (required "
              "unless --recipe gives it).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output directory.")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Replay a run: the options of its hcconvert.json (or of a JSON object of "
              "options); flags given here override them.")
@click.option("--calib", metavar="SOURCE[:W],...", help="Calibration text: a file (.jsonl / "
              ".json(.gz) / .parquet with a text field, a PROMPT+RESPONSE pair or chat "
              "messages, or .txt / .md), or a Hub dataset hf:ORG/NAME[@REV][:config=C]"
              "[:split=S][:field=F] (only the files the samples need are fetched, through the "
              "HF cache); several mixed by weight as A:W,B:W. Default: the paper's C4 shard "
              "from the Hub.")
@calibration_numbers
@click.option("--method", type=click.Choice(METHOD_NAMES), default=DEFAULTS["method"],
              show_default=True, metavar="NAME",
              help="A named method (README's table): auto (per layer, the layer-fitted "
              "candidate that best reproduces the original layer's output), hc-smoe, msmoe, "
              "ream, o-prune, f-prune-fit, ... (merge and prune: hc-smoe and f-prune). The "
              "options below override its settings.")
@click.option("--layer-fit/--no-layer-fit", default=None,
              help="Refit the kept or merged experts' down projections so the reduced layer "
              "reproduces the original layer's output on the calibration tokens.")
@click.option("--metric", type=click.Choice(METRICS),
              help="Expert similarity for grouping: mean output over the calibration tokens, "
              "router-logit column on sampled tokens, or the flattened weights.")
@click.option("--grouping", type=click.Choice(GROUPINGS), help="hierarchical: HC-SMoE; "
              "dominant: the R most used experts lead and the rest join the nearest; kmeans; "
              "random.")
@click.option("--linkage", type=click.Choice(LINKAGES), help="Linkage of hierarchical "
              "grouping.")
@click.option("--max-group-size", type=int, metavar="N",
              help="Merge at most N experts into one (default: no limit; REAM's C, counting "
              "the leader: ream 16, ream-balanced ceil(E/R)).")
@click.option("--merge", type=click.Choice(MERGES),
              help="freq / average: weighted / plain average of weights; fix-dom: the most "
              "used member's neurons absorb the others' most correlated ones; msmoe: neurons "
              "aligned to the most used member (Hungarian), then freq; mergemoe: msmoe's gate "
              "and up, down fitted by least squares to the members' outputs; ream (REAM's "
              "groups): neurons matched to the leader by activation and weight-feature "
              "distance, then the saliency-weighted average.")
@click.option("--prune-by", type=click.Choice(PRUNE_BY), help="A pruning method keeps the "
              "experts picked most often (F-prune) or with the largest routed output, REAP's "
              "saliency (O-prune).")
@click.option("--saliency", type=click.Choice(SALIENCIES), help="REAM's leaders and merge "
              "weights: ream, as its official code computes it (softmax of the raw router "
              "logits, zero floor); routed, REAP's from the model's own routing (O-prune's).")
@click.option("--similarity", type=click.Choice(SIMILARITIES), help="REAM's expert "
              "similarity: ream, the official code's (probability-weighted mean outputs, "
              "router-logit columns over all tokens); cosine, hcconvert's (two plain cosines).")
@router_option
@click.option("--propagate", type=click.Choice(PROPAGATIONS), help="Next layer's input: the "
              "original layer's output, or the reduced one's (REAM's default).")
@click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULTS["dtype"],
              show_default=True, help="A quantized SRC's weights in the output (FP8, INT4): "
              "source writes merged experts back in its format with fresh scales and copies "
              "the rest as stored; bf16 writes every quantized weight dequantized and drops "
              "config.json's quantization_config.")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
              callback=size)
@click.option("--max-gpu-memory", metavar="SIZE", callback=size,
              help="GPU memory a layer may use, e.g. 40GB: a MoE layer's experts stay on the "
              "host and come to the GPU in chunks that fit (default: the free GPU memory less "
              "a margin). Results do not depend on it.")
@device_option
@compute_dtype_option
@click.option("--revision", help="Hub revision of SRC.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--resume/--no-resume", default=None,
              help="--resume: go on from where an interrupted run of the same command stopped, "
              "and when this run is stopped (Ctrl-C, SIGTERM) keep its finished layers for "
              "the next. --no-resume: start over. Default: go on from a run that was killed "
              "outright; clean up when stopped.")
@click.option("--low-disk", is_flag=True, help="A Hub SRC: delete each shard from the HF "
              "cache once every tensor in it is read, so the cache holds about a layer's "
              "shards instead of the whole checkpoint.")
@click.option("--dry-run", is_flag=True, help="Print the plan and check what the run needs "
              "(tokenizer, calibration text, disk, Hub access); reads headers only, exits 2 "
              "where the run would fail.")
@click.option("--push-to-hub", "push_repo", metavar="REPO", help="Upload the result (token, "
              "repo name and write access are checked before the conversion starts).")
@click.option("--private", is_flag=True, help="With --push-to-hub: a private repo.")
@click.pass_context
def convert(ctx, src, out, recipe, overwrite, resume, low_disk, dry_run, push_repo, private,
            **given) -> None:
    """Convert SRC (a directory or a Hub repo id; with --recipe, by default the recipe's)
    into a checkpoint with fewer experts."""
    def action():
        nonlocal src
        options, src = options_from(ctx, given, recipe, src)
        from ..pipeline.calibration import uses_hub

        probe_hub_if_needed(src, also=uses_hub(options.calib) or push_repo is not None)
        if push_repo:
            from ..io.hub import check_push

            check_push(push_repo)
        if low_disk:
            from ..io.source import check_low_disk

            check_low_disk(src)
        if dry_run:
            from .report import print_plan

            return print_plan(src, options, out, overwrite, low_disk)
        if out is None:
            raise UserError("--out is required (or pass --dry-run)")
        from ..pipeline.convert import convert as run_conversion
        from ..pipeline.preflight import check_ready, plan_from_headers
        from .report import print_summary

        check_ready(*plan_from_headers(src, options), out, overwrite, low_disk)
        conversion = run_conversion(src, out, options, overwrite=overwrite, resume=resume,
                                    low_disk=low_disk)
        print_summary(conversion)
        if push_repo:
            from ..io.hub import push

            push(out, push_repo, private)

    run_guarded(action)


def options_from(ctx: click.Context, given: dict, recipe: Path | None,
                 src: str | None) -> tuple[ConvertOptions, str]:
    """The options of the recipe (if any) with the flags given on the command line over them,
    and SRC (the recipe's where none is given); without a recipe, every flag's value, defaults
    included."""
    values, recipe_src = read_recipe(recipe) if recipe else ({}, None)
    for name, value in given.items():
        if recipe is None or ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
            values[name] = value
    if values.get("experts") is None:
        raise UserError("--experts is required (or pass --recipe FILE)")
    src = src or recipe_src
    if src is None:
        raise UserError("SRC is required: a checkpoint directory or Hub repo id"
                        + (f" (recipe {recipe} names none)" if recipe else ""))
    return ConvertOptions(**values), src


def parse_methods(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """The comma-separated method names, each once, in order."""
    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        given = f"unknown method {unknown[0]!r}" if unknown else "no method named"
        raise click.BadParameter(f"{given}; choose from {', '.join(RECIPES)}")
    return names


def parse_texts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Path]:
    """Evaluation texts, comma-separated; each is read (and refused if it must be) later."""
    if value is None:
        return []
    paths = [Path(part.strip()) for part in value.split(",") if part.strip()]
    if not paths:
        raise click.BadParameter("names no file")
    return paths


@main.command("compare")
@click.argument("src")
@click.option("--experts", "-r", type=int, required=True, help="Experts to keep per MoE layer.")
@click.option("--calib", required=True, metavar="SOURCE[:W],...",
              help="Calibration text, as for convert (files, Hub datasets hf:ORG/NAME).")
@click.option("--eval", "eval_text", required=True, callback=parse_texts,
              metavar="FILE[,FILE...]", help="Held-out text for perplexity, KL and the long "
              "greedy continuations (.txt, .jsonl, .json.gz); several comma-separated are "
              "each scored on their own too.")
@click.option("--methods", default=",".join(DEFAULT_COMPARISON), show_default=True,
              callback=parse_methods, metavar="A,B,...",
              help=f"Reductions to compare, from: {', '.join(RECIPES)}.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Keep each reduced checkpoint in DIR/<method> (default: a temporary "
              "directory, removed at the end).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as CSV.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as JSON.")
@calibration_numbers
@router_option
@click.option("--eval-seq-len", type=EVAL_NUMBER, default=512, show_default=True,
              help="Tokens per evaluation sequence.")
@click.option("--eval-samples", type=EVAL_NUMBER, default=64, show_default=True,
              help="Evaluation sequences of each --eval text.")
@device_option
@compute_dtype_option
@click.option("--overwrite", is_flag=True, help="Replace non-empty DIR/<method> directories.")
def compare(src, methods, eval_text, out_dir, csv_path, json_path, eval_seq_len, eval_samples,
            overwrite, **kwargs) -> None:
    """Reduce SRC with several methods from one calibration pass (each layer's statistics are
    computed once for all), then score each against SRC: perplexity, KL, long greedy
    continuations and minutes, over all --eval texts and, with several, per text."""
    def action():
        base = ConvertOptions(**kwargs)
        from ..eval.compare import compare as run_comparison
        from ..eval.compare import (
            markdown_table,
            named_variants,
            planned_bytes,
            write_csv,
            write_json,
        )
        from ..eval.evaluate import held_out_tokens
        from ..io.staging import check_results_file
        from ..model.spec import open_source

        for option, path in (("--csv", csv_path), ("--json", json_path)):
            if path:
                check_results_file(option, path, src)

        from ..pipeline.calibration import uses_hub

        probe_hub_if_needed(src, also=uses_hub(base.calib))
        variants = named_variants(methods, base)
        # Bad --eval text is refused now, not after every conversion.
        for text in eval_text:
            held_out_tokens(open_source(src)[0], text, eval_samples, eval_seq_len)
        click.echo(f"disk: {human_bytes(planned_bytes(src, variants))} for "
                   f"{len(variants)} reduced checkpoints", err=True)
        keep = contextlib.nullcontext(out_dir) if out_dir else tempfile.TemporaryDirectory()
        with keep as workdir:
            results = run_comparison(src, variants, eval_text, Path(workdir), eval_seq_len,
                                     eval_samples, base.device, progress=True,
                                     overwrite=overwrite)
        click.echo(markdown_table(results))
        for path, write in ((csv_path, write_csv), (json_path, write_json)):
            if path:
                write(results, path, kept=out_dir is not None)
                click.echo(f"wrote {path}")

    run_guarded(action)


@main.command()
@click.argument("src")
@click.option("--revision", help="Hub revision of SRC.")
def inspect(src, revision) -> None:
    """Describe SRC without reading tensor data."""
    from .report import print_inspection

    def action():
        probe_hub_if_needed(src)
        print_inspection(src, revision)

    run_guarded(action)


@main.command("eval")
@click.argument("original")
@click.argument("reduced")
@click.option("--text", required=True, callback=parse_texts, metavar="FILE[,FILE...]",
              help="Held-out text (.txt, .jsonl, .json.gz); several comma-separated are each "
              "scored on their own too.")
@click.option("--seq-len", type=EVAL_NUMBER, default=512, show_default=True)
@click.option("--samples", type=EVAL_NUMBER, default=64, show_default=True,
              help="Sequences of each text.")
@device_option
@click.option("--record", is_flag=True, help="Also write the numbers into REDUCED's model "
              "card and hcconvert.json (REDUCED: a directory hcconvert wrote).")
def evaluate_command(original, reduced, text, seq_len, samples, device, record) -> None:
    """Perplexity of ORIGINAL and REDUCED on TEXT, KL(original ‖ reduced), top-1 agreement,
    and both models' greedy continuations of held-out prompts: how many leading tokens of
    the original's REDUCED reproduces, how often each repeats itself, how varied they are, and
    how likely ORIGINAL finds them."""
    from ..eval.evaluate import evaluate, source_names
    from ..eval.greedy import CONTINUATION_TOKENS, PROMPTS
    from ..pipeline.metadata import evaluation_table

    def action():
        if record and not (Path(reduced) / "hcconvert.json").is_file():
            raise UserError(f"--record: {reduced} is not a directory hcconvert wrote")
        probe_hub_if_needed(original, reduced)
        result = evaluate(original, reduced, text, seq_len, samples, device)
        numbers = dataclasses.asdict(result)
        if record:
            from ..pipeline.metadata import record_evaluation

            record_evaluation(Path(reduced), original, source_names(text), numbers)
        click.echo(evaluation_table(numbers))
        click.echo(f"\ngreedy continuations: {CONTINUATION_TOKENS} tokens after each of "
                   f"{PROMPTS} prompts per text; in brackets, the original's own")
        click.echo(f"peak host memory     {human_bytes(peak_rss_bytes())}")
        gpu = peak_gpu_bytes()
        if gpu is not None:
            click.echo(f"peak GPU memory      {human_bytes(gpu)}")

    run_guarded(action)
