"""``python -m mlclt_utils.bench {peak,train,clt,attribution,sae,controls}`` (see the package docstring)."""

from __future__ import annotations

import argparse

from . import __doc__ as DOC
from . import available_cores, measure_matmul_peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlclt_utils.bench", description=DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "peak", "clt", "attribution", "sae", "controls"])
    args, rest = parser.parse_known_args(argv)
    if args.command == "controls":
        from .controls import main as controls_main

        return controls_main(rest)
    if args.command == "sae":
        from .sae import main as sae_main

        return sae_main(rest)
    if args.command == "attribution":
        from .attribution import main as attribution_main

        return attribution_main(rest)
    if args.command == "clt":
        from .clt import main as clt_main

        return clt_main(rest)
    sub = argparse.ArgumentParser(prog=f"python -m mlclt_utils.bench {args.command}")
    sub.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    sub.add_argument("--device", default="cpu")
    if args.command == "train":
        sub.add_argument("--presets", nargs="+", default=["tiny", "small"])
        sub.add_argument("--sizes", nargs="+", default=None, help="size names (default: all)")
        sub.add_argument("--steps", type=int, default=20)
        sub.add_argument("--warmup", type=int, default=3)
        sub.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the preset's)")
        sub.add_argument("--paths", nargs="+", default=["before", "lean+fp32", "lean"],
                         help="training paths timed side by side: before, hooked, lean, lean+fp32, "
                              "lean+compile")
    opts = sub.parse_args(rest)
    if args.command == "peak":
        threads = opts.threads or available_cores()
        print(f"matmul peak: {measure_matmul_peak(threads, device=opts.device):.1f} GFLOP/s "
              f"(float32, {threads} threads)")
    else:
        from .train import run_train_benchmark

        run_train_benchmark(opts.presets, opts.sizes, opts.steps, opts.warmup, opts.threads,
                            opts.device, tuple(opts.paths), opts.batch_size)


if __name__ == "__main__":
    main()
