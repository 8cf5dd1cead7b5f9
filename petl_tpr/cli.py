"""`petl-tpr` command line: demo, quickstart, presets, inspect, bench, train, eval."""

from __future__ import annotations

import argparse
import json
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run

    run(args.out, batch=args.batch, small=args.small)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS
    from .registry import METHODS

    for name, entries in PRESETS.items():
        parts = [e["method"] if e["method"] in METHODS else f"{e['method']} (not available yet)" for e in entries]
        print(f"{name:<24} " + " + ".join(parts))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Show what a preset or spec file attaches to a CLIP ViT-B/16 built from config."""
    from . import Spec, inject, summary
    from .quickstart import build_clip_b16

    model = build_clip_b16(small=args.small)
    if args.spec.endswith(".json"):
        with open(args.spec) as handle:
            spec = Spec.from_json(handle.read())
    else:
        spec = Spec.preset(args.spec, without=tuple(args.without))
    report = inject(model, spec)
    print(report.describe())
    print(summary(model).table())
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    """Also under `torchrun --nproc_per_node N -m petl_tpr train ...` (rank 0 prints)."""
    from .tpr.training.distributed import cleanup, process_rank
    from .tpr.training.run_config import load_run_config, run_training

    config = load_run_config(args.config)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size)) if v is not None}
    out = args.out or f"runs/{config.preset.replace(':', '_')}_{config.dataset}"
    history = run_training(config, data_root=args.data_root, backbone=args.backbone, pretrained=args.pretrained,
                           out_dir=out, resume=args.resume, overrides=overrides, stop_after=args.stop_after,
                           device=args.device)
    last = history[-1] if history else {}
    if process_rank() == 0:
        print(f"trained {len(history)} epoch(s) into {out}; last epoch: "
              + json.dumps({k: v for k, v in last.items() if k in ("epoch", "loss", "val", "test")}))
    cleanup()
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .tpr.training.run_config import load_run_config, run_evaluation

    metrics = run_evaluation(load_run_config(args.config), data_root=args.data_root, backbone=args.backbone,
                             adapters=args.adapters, pretrained=args.pretrained, split=args.split,
                             batch_size=args.batch_size, device=args.device)
    print(json.dumps({"split": args.split, "adapters": str(args.adapters), **metrics}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .tpr.demo import DemoConfig, run_seeds

    options = dict(backbone=args.backbone, threads=args.threads, progress=args.progress, device=args.device)
    if args.methods:
        options["methods"] = tuple(args.methods)
    config = DemoConfig.quick(args.out, **options) if args.quick else DemoConfig(out_dir=args.out, **options)
    run_seeds(config, args.seeds, fresh=args.fresh)
    return 0


BENCHMARKS = {"moa": "moa_routing.py", "forward": "forward_time.py", "memory": "train_memory.py"}


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark script of the source checkout (benchmarks/ is not part of the installed package)."""
    from pathlib import Path
    import runpy

    from .errors import PetlError

    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[args.name]
    if not script.is_file():
        raise PetlError(f"{script} not found: the benchmarks ship with the source repository, run from a checkout")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .tpr.demo import METHODS as DEMO_METHODS

    parser = argparse.ArgumentParser(prog="petl-tpr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("quickstart", help="inject UP-Person (S-Prefix + LoRA + L-Adapter) into CLIP ViT-B/16, train a step, save, reload")
    p.add_argument("--out", default="runs/quickstart", help="directory for the adapter file")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--small", action="store_true", help="2-layer towers instead of 12 (for a fast check)")
    p.set_defaults(func=_quickstart)
    p = sub.add_parser("demo", help="pre-train a small CLIP on synthetic domain 0, transfer it to domain 1 with "
                                    "zero-shot, full fine-tuning, LoRA, UP-Person, DM-Adapter and UniPT; print the "
                                    "table, plot R@1 against trainable parameters, evaluate on an unseen domain 2 and "
                                    "draw the retrieval pictures (CPU, no downloads)")
    p.add_argument("--out", default="runs/demo", help="run directory (finished steps are reused on a re-run)")
    p.add_argument("--backbone", choices=("transformers", "open_clip"), default="transformers",
                   help="library whose CLIP config builds the small model")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of: " + ", ".join(
        repr(m) if " " in m else m for m in DEMO_METHODS))
    p.add_argument("--quick", action="store_true", help="tiny sizes, one epoch per method (a smoke run)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    p.add_argument("--seeds", type=int, default=1, help="run N seeds (seed-<s>/ each) and report the mean and "
                                                         "spread of every column (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=_presets)
    p = sub.add_parser("inspect", help="show where a preset or spec JSON attaches on CLIP ViT-B/16 and count parameters")
    p.add_argument("spec", help="preset name or path to a spec .json")
    p.add_argument("--without", nargs="*", default=[], help="methods to leave out of the preset")
    p.add_argument("--small", action="store_true")
    p.add_argument("--json", action="store_true", help="also print the spec as JSON")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("bench", help="run a benchmark: moa (routed mixture-of-adapters op), forward (forward time per "
                                     "method), memory (training-step memory per method); options after the name go "
                                     "to the script (e.g. --quick, --device cuda)")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    p = sub.add_parser("train", help="train a paper's recipe (configs/*.toml) on a dataset directory")
    p.add_argument("--config", required=True, help="run config .toml (see configs/)")
    p.add_argument("--data-root", required=True, help="directory holding CUHK-PEDES/, ICFG-PEDES/ or RSTPReid/")
    p.add_argument("--backbone", required=True, help="transformers CLIP directory/name, open_clip arch or checkpoint")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>_<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None,
                   help="return after this epoch (checkpoint written, schedule unchanged); continue with --resume")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available; under "
                                                  "torchrun each process takes cuda:LOCAL_RANK)")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="text -> image metrics of a trained adapter file on a dataset split")
    p.add_argument("--config", required=True, help="the run config the adapters were trained with")
    p.add_argument("--data-root", required=True)
    p.add_argument("--backbone", required=True, help="the backbone the adapters were trained on")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--adapters", required=True, help="adapter file, e.g. runs/NAME/best.safetensors")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=_eval)
    args = parser.parse_args(argv)
    from .errors import PetlError

    try:
        return args.func(args)
    except PetlError as error:
        print(f"petl-tpr {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
