"""The ``geobind`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
from pathlib import Path

EPILOG_TRAIN = """\
examples:
  geobind train --show-config paper > run.yaml     # the paper's two stages: set its data paths
  geobind train run.yaml                           # relative paths: from run.yaml's folder
  geobind train run.yaml --set stages.satellite.optim.lr=1e-4 --set seed=1
  geobind train run.yaml --resume                       # continue after Ctrl-C or a crash
  torchrun --nproc_per_node 4 -m geobind train run.yaml # all GPUs of one machine
  geobind train run.yaml --set stages.satellite.optim.compile=true    # GPU: a compiled step
  geobind train run.yaml --set stages.satellite.encoder.augment_on=device  # GPU: augment there
  geobind train run.yaml --profile 50:5   # steps 51-55 of each stage under torch.profiler
  geobind train run.yaml --set stages.satellite.optim.grad_checkpointing=true  # bigger batches fit
"""

EPILOG_EVAL = """\
examples:
  geobind eval --model runs/geobind/model --data test.csv --out report.json
  geobind eval --model runs/geobind/model --data shards/test/ --out report.json
  geobind eval --model runs/geobind/model --data splits/metadata.test.csv --layout soundingearth \\
      --layout-option root=/data/SoundingEarth --out report.json   # a split written elsewhere
  geobind eval --model M --data test.csv --ks 1,5,10,100              # R@100 as GeoCLAP reports it
  geobind eval --model M --data test.csv --candidates 10000           # among 10,000 as Sat2Cap ranks
"""


def _command_name(args) -> str:
    """``data check``, ``index build``, ``train``: the subcommand as typed, for messages."""
    return " ".join(filter(None, (getattr(args, k, None) for k in ("command", "data_command", "index_command"))))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geobind",
        description="GeoBind: one embedding space for satellite images, ground photos, text and audio.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent("""\
            start here:
              geobind demo                 train and evaluate on the embedded synthetic Earth
              geobind train CONFIG.yaml    run the binding stages of a config
              geobind eval --model DIR --data test.csv --out report.json
            every command has --help with examples."""),
    )
    from geobind import __version__

    p.add_argument("--version", action="version", version=f"geobind {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="run the binding stages of a YAML config",
                       description="Train a GeoBind space: bind each stage's modality to its anchor, in "
                                   "order, with resumable checkpoints; then save the model and, if the "
                                   "config asks, evaluate it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_TRAIN)
    t.add_argument("config", nargs="?", help="YAML run config")
    t.add_argument("--show-config", metavar="NAME", choices=shipped_configs(),
                   help=f"print a config that ships with geobind ({', '.join(shipped_configs())}) and exit")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=_override,
                   help="override a config value (dotted path; stages by index or name); repeatable")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its checkpoints")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--profile", type=_profile_window, default=None, metavar="AFTER:STEPS",
                   help="record STEPS steps of each stage, after its first AFTER (which hold start-up and "
                        "compilation), with torch.profiler: a trace for Perfetto or chrome://tracing and a "
                        "table of the costliest operators in <stage>/profile/")
    t.set_defaults(func=cmd_train)

    from geobind.cli_data import add_layout_arguments

    e = sub.add_parser("eval", help="retrieval metrics between every pair of modalities",
                       description="Retrieval metrics (R@1, R@5, R@10, median and mean rank) between every "
                                   "pair of the model's modalities that the dataset holds.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_EVAL)
    e.add_argument("--model", required=True, help="GeoBind model directory")
    e.add_argument("--data", required=True,
                   help="dataset: manifest CSV/Parquet, shard folder/pattern, or a --layout's root or CSV")
    add_layout_arguments(e)
    e.add_argument("--out", help="write the report JSON here")
    e.add_argument("--batch-size", type=positive_int, default=64, help="items per forward pass (default: 64)")
    e.add_argument("--ks", type=_recall_ks, default=(1, 5, 10), metavar="K,K,...",
                   help="R@k to report, comma-separated (default: 1,5,10; GeoCLAP reports R@100: "
                        "--ks 1,5,10,100); R@1, R@5 and R@10 are always included")
    e.add_argument("--candidates", type=positive_int, default=None,
                   help="rank among a seeded random subset of this many rows instead of all rows "
                        "(Sat2Cap evaluates among 10,000)")
    e.add_argument("--seed", type=int, default=0, help="seed of the --candidates subset (default: 0)")
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    try:
        from geobind.demo import add_demo_parser
    except ImportError:
        add_demo_parser = None
    if add_demo_parser is not None:
        add_demo_parser(sub)
    from geobind.cli_space import add_space_parsers

    add_space_parsers(sub)
    from geobind.cli_data import add_data_parser

    add_data_parser(sub)
    from geobind.cli_serve import add_serve_parser

    add_serve_parser(sub)
    _wrap_descriptions(p)
    return p


def _wrap_descriptions(parser: argparse.ArgumentParser, width: int = 88) -> None:
    """Wrap every subcommand's one-paragraph description (the raw formatter, kept for the
    examples, would print each as one long line)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            if isinstance(sub, argparse.ArgumentParser):
                if sub.description and "\n" not in sub.description:
                    sub.description = textwrap.fill(sub.description, width)
                _wrap_descriptions(sub, width)


def whole_number(text: str, least: int = 1, expected: str | None = None) -> int:
    """``text`` as an integer of ``least`` or more, or argparse's error saying what was
    ``expected`` (by default "a whole number of <least> or more")."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {expected or f'a whole number of {least} or more'}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    return whole_number(text, 1)


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _device(name: str):
    from geobind.distributed import parse_device

    return parse_device(name)


def _override(text: str) -> str:
    """argparse type of ``--set``: ``KEY=VALUE``, checked here so that ``--set key value`` is
    reported as what it is (not as an unrecognised argument ``value``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, e.g. stages.satellite.optim.lr=1e-4 (no spaces around =), got {text!r}")
    return text


def _profile_window(text: str) -> tuple[int, int]:
    after, sep, steps = text.partition(":")
    try:
        window = (int(after), int(steps))
    except ValueError:
        window = None
    if not sep or window is None or window[0] < 0 or window[1] < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use AFTER:STEPS, e.g. 50:5 (skip 50 steps, then record 5)")
    return window


CONFIGS = Path(__file__).parent / "configs"  # run configs that ship with geobind


def shipped_configs() -> list[str]:
    """Names of the run configs that ship with geobind (``geobind train --show-config NAME``)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def cmd_train(args) -> int:
    """``geobind train``: train a config's stages, then evaluate if it asks; returns the exit code."""
    from geobind.binding.trainer import train
    from geobind.config import load_config

    if args.show_config:
        sys.stdout.write((CONFIGS / f"{args.show_config}.yaml").read_text())
        return 0
    if not args.config:
        print("geobind train: error: give a YAML run config (`geobind train --show-config paper > run.yaml` "
              "writes the paper's, to edit)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    final = train(cfg, resume=args.resume, progress=not args.no_progress, profile=args.profile)
    from geobind import distributed

    main_rank = distributed.is_main()
    # Every rank has finished training: the ranks leave the process group together (on a clean
    # exit only, as embed does), and rank 0 evaluates alone.
    distributed.cleanup()
    if cfg.eval is not None and main_rank:  # under torchrun: once, on rank 0
        from geobind.data.manifest import read_dataset
        from geobind.evaluate import evaluate
        from geobind.model import GeoBind

        model = GeoBind.from_pretrained(final, device=_device(cfg.device))
        data = read_dataset(cfg.eval.data, cfg.eval.layout, **cfg.eval.layout_options)
        report = evaluate(model, data, batch_size=cfg.eval.batch_size)
        out = Path(cfg.output_dir) / "report.json"
        write_report(report, out, force=True)
        print_report(report, model)
        print(f"report written to {out}")
    return 0


def print_report(report: dict, model) -> None:
    """The evaluation's table of pairs, then what it skipped (if anything)."""
    from geobind.evaluate import format_pairs, format_skipped, trained_pairs

    print(format_pairs(report["pairs"], trained_pairs(model)))
    skipped = format_skipped(report)
    if skipped:
        print(skipped)


def write_report(report: dict, path: Path, force: bool) -> None:
    """Write ``report`` to ``path`` as indented JSON, atomically; an existing file is replaced only
    with ``force``."""
    from geobind.search.common import atomic_path

    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def cmd_eval(args) -> int:
    """``geobind eval``: evaluate a model on a dataset, print the report; returns the exit code."""
    from geobind.cli_data import parse_layout_options
    from geobind.data.manifest import read_dataset
    from geobind.evaluate import evaluate
    from geobind.model import GeoBind
    from geobind.search.common import check_writable

    if args.out and Path(args.data).is_file() and Path(args.out).resolve() == Path(args.data).resolve():
        raise ValueError(f"--out {args.out} is the dataset being evaluated (--data): name a new .json file")
    check_writable(args.out, force=args.force)  # before the evaluation, which can take a while
    model = GeoBind.from_pretrained(args.model, device=_device(args.device))
    data = read_dataset(args.data, args.layout, **parse_layout_options(args.layout_options))
    report = evaluate(model, data, batch_size=args.batch_size, progress=not args.no_progress, ks=args.ks,
                      candidates=args.candidates, seed=args.seed)
    print_report(report, model)
    if args.candidates is not None:
        fewer = sorted({m["n"] for m in report["pairs"].values() if m["n"] < args.candidates})
        if fewer:  # not the subset asked for: numbers not comparable with a paper's among N
            print(f"note: --candidates {args.candidates}: pairs of n <= {fewer[-1]} usable rows were ranked among "
                  "all their rows")
    if args.out:
        write_report(report, Path(args.out), force=args.force)
        print(f"report written to {args.out}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (from a scheduler, ``timeout`` or ``docker stop``) while a command runs: handled
    as Ctrl-C is, so partial outputs are removed and resumable work is kept."""


def _trainer_error(name: str) -> tuple[type[BaseException], ...]:
    """The training exception ``name`` of :mod:`geobind.binding.trainer` when a command has
    imported it, else nothing to catch (a command that never imported the trainer cannot raise
    it). Looked up when an exception reaches the ``except`` clause, so that commands other than
    ``train`` do not import the trainer (torch, transformers, pandas) just to name its errors."""
    trainer = sys.modules.get("geobind.binding.trainer")
    return (getattr(trainer, name),) if trainer is not None else ()


def _raise_terminated(signum, frame) -> None:
    trainer = sys.modules.get("geobind.binding.trainer")
    if trainer is not None:  # only a command that trains reads it
        trainer.StopRequests.last_signal = signum  # a run stopped outside its steps exits 143 too
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _recall_ks(text: str) -> tuple[int, ...]:
    """``--ks``: whole numbers >= 1 separated by commas (``evaluate`` adds 1, 5 and 10)."""
    try:
        ks = {int(k) for k in text.split(",") if k.strip()}
    except ValueError:
        ks = {0}
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers >= 1 separated by commas, e.g. 1,5,10,100")
    return tuple(sorted(ks))


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that ``args`` were parsed by: ``geobind index build``'s, say."""
    while True:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest or "", None) in action.choices:
                parser = action.choices[getattr(args, action.dest)]
                break
        else:
            return parser


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """Exit (status 2) naming the arguments ``parser`` does not take, with the option meant
    where one is close (``-k`` -> ``--k``, ``--tetx`` -> ``--text``)."""
    import difflib

    options = [o for a in parser._actions for o in a.option_strings]
    guesses = [(x, m[0]) for x in extra if x.startswith("-")
               for m in [difflib.get_close_matches(x.split("=", 1)[0], options, n=1, cutoff=0.6)] if m]
    hint = (f" (did you mean {guesses[0][1]}?)" if len(guesses) == 1 else
            f" (did you mean {', '.join(f'{m} for {x}' for x, m in guesses)}?)" if guesses else "")
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``geobind`` command; returns the exit status."""
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's own parser, with its usage, not the top-level one's
            _unrecognized(_chosen_parser(parser, args), extra)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        from geobind.config import ConfigError

        import_plugins()
    except ImportError as e:
        print(f"geobind: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the command starts (imports take a second)
        print("\ngeobind: interrupted", file=sys.stderr)
        return 130

    try:
        with _sigterm_as_interrupt():
            status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError as e:
        # The reader of stdout went away (`geobind search --json | head -1`): stop quietly.
        # Later writes (the interpreter's final flush included) go to devnull instead of failing
        # again. A broken pipe of anything else is an error like any other.
        import os

        if not _stdout_reader_gone():
            print(f"geobind {_command_name(args)}: error: {e}", file=sys.stderr)
            return 2
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):
            pass  # stdout is not a file descriptor (captured or replaced)
        return 1
    except _trainer_error("TrainingInterrupted") as e:
        import signal

        from geobind.binding.trainer import StopRequests
        from geobind.distributed import is_main

        if is_main():  # under torchrun every rank stops; one says so
            print(f"\n{e}", file=sys.stderr)
        return 128 + (StopRequests.last_signal or signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: no traceback; say what a rerun keeps
        resumes = getattr(args.func, "__name__", "") in ("cmd_embed", "cmd_pack")
        demo = getattr(args.func, "__name__", "") == "_cmd_demo"
        print(f"\ngeobind {_command_name(args)}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}"
              + ("; run the same command again to resume where it stopped" if resumes else "")
              + ("; run the same command with --resume to finish it (or --force to start again)" if demo else ""),
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except _trainer_error("TrainingOutOfMemory") as e:
        print(f"\ngeobind {_command_name(args)}: error{_rank_note()}: {e}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError, ImportError) as e:
        # ImportError: an optional extra the command needs is missing (its message names the
        # `pip install` that brings it).
        if getattr(e, "on_every_rank", False) and _rank_note():
            return 2  # the same refusal on every rank: rank 0 says it
        print(f"geobind {_command_name(args)}: error{_rank_note()}: {cli_message(e)}", file=sys.stderr)
        return 2


def _rank_note() -> str:
    """`` (rank N)`` under torchrun on ranks other than 0 (each rank reports its own error, and
    an error one rank alone met is told from the others'); empty otherwise."""
    import os

    r, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f" (rank {r})" if r not in (None, "0") and world not in (None, "1") else ""


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or stdout is not a descriptor
        return False


def import_plugins(spec: str | None = None) -> list[str]:
    """Import the modules named in ``spec`` (default: ``$GEOBIND_PLUGINS``, comma-separated),
    which register modalities, encoders or layouts, so that every command knows them."""
    import importlib
    import os

    names = [n.strip() for n in (os.environ.get("GEOBIND_PLUGINS", "") if spec is None else spec).split(",")]
    for name in filter(None, names):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"GEOBIND_PLUGINS names {name!r}, which cannot be imported ({e}); "
                              "install it or add its folder to PYTHONPATH") from e
        except Exception as e:  # the plugin itself failed (a registration refused, say)
            raise ImportError(f"GEOBIND_PLUGINS module {name!r} failed while importing: "
                              f"{type(e).__name__}: {e}") from e
    return [n for n in names if n]


def cli_message(e: BaseException) -> str:
    """An error's text for the command line (options named as flags, not Python arguments)."""
    from geobind.search.common import OutputExistsError

    return e.cli_message() if isinstance(e, OutputExistsError) else str(e)


if __name__ == "__main__":
    sys.exit(main())
