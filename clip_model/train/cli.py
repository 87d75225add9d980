"""``clip-train``: one command line for training and evaluating CLIP models.

Subcommands live in their own modules, each exposing ``add_arguments(parser)`` and ``run(args) -> int``:

- ``fit``: train from scratch or fine-tune (:mod:`clip_model.train.fit`), also under ``torchrun``
- ``finetune``: adapt a pretrained model with LoRA or full fine-tuning, evaluated before and after (:mod:`.finetune`)
- ``eval``: retrieval recall@1/5/10 and zero-shot accuracy of any model on any captioned folder (:mod:`.evaluate`)
- ``probe``: a linear probe on frozen image features of a labelled folder (:mod:`.probe`)
- ``synth``: generate the synthetic shapes dataset (:mod:`.synthetic`)
- ``demo``: generate the shapes data and train (or reuse) the demo model (:mod:`.demo`)

Exit codes: 0 done, 1 the run could not complete (the message says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from ..errors import ClipModelError
from ..process_tuning import ThreadPlan, own_threads
from .data import DatasetError

logger = logging.getLogger("clip_model.train")

COMMANDS = {
    "fit": ("fit", "train from scratch or fine-tune on image-caption pairs"),
    "finetune": ("finetune", "adapt a pretrained model to captioned images (LoRA or full), evaluated before and after"),
    "eval": ("evaluate", "retrieval recall@k and zero-shot accuracy on a captioned folder"),
    "probe": ("probe", "fit a linear probe on frozen image features of a labelled folder"),
    "synth": ("synthetic", "generate the synthetic shapes dataset (deterministic from a seed)"),
    "demo": ("demo", "generate the shapes data and train, or reuse, the demo model"),
    "multilingual": ("multilingual", "the demo in English, German and French: an XLM-R text tower, its vocabulary"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        command = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    plan = training_plan(os.environ)
    logger.debug("threads: %s", plan.describe())
    try:
        with own_threads(plan.torch_threads):  # the training loop runs on this thread
            return int(args.run(args))
    except (ClipModelError, DatasetError) as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; the last saved checkpoint is kept (--resume continues from it)")
        return 130


def training_plan(environ: Mapping[str, str]) -> ThreadPlan:
    """The thread plan of one training process: ``OMP_NUM_THREADS`` when set (torchrun sets it to 1 unless the user
    did), else the cores split between the ``LOCAL_WORLD_SIZE`` processes torchrun started on this machine."""
    try:
        threads = int(environ.get("OMP_NUM_THREADS", "0"))
        processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as exc:
        raise SystemExit(f"clip-train: OMP_NUM_THREADS and LOCAL_WORLD_SIZE must be whole numbers ({exc})") from exc
    return ThreadPlan.for_training(threads, processes=processes)


if __name__ == "__main__":
    sys.exit(main())
