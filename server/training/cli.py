"""`prefix-train`: train a prefix on a JSONL file, write a registry artifact, optionally upload it.

    prefix-train --model ./my-model --train data.jsonl --val-fraction 0.1 \\
        --prefix-len 10 --init words --init-text "Answer politely:" \\
        --output formal.safetensors --name formal [--upload http://127.0.0.1:8000 --api-key KEY]

See docs/training.md for every option. Exit status: 0 done, 1 the run failed, 2 bad arguments.
torch and the model code are imported only after the flags are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path
from typing import Any

from server.training.config import (
    INITS,
    PRECISIONS,
    REPARAMS,
    SCHEDULES,
    TrainConfig,
    TrainConfigError,
)

_D = TrainConfig()  # the defaults shown in --help


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it means something: not for on/off switches or unset values."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, argparse._StoreConstAction) or action.default in (None, ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefix-train", formatter_class=_HelpFormatter,
        description="Train a Prefix-Tuning prefix for a frozen model on a JSONL file, write it "
                    "as a registry artifact, and optionally upload it to a prefix-serve server.")
    p.add_argument("--version", action="version",
                   version=f"%(prog)s {importlib.metadata.version('prefix-serve')}")
    io = p.add_argument_group("model, data and output")
    io.add_argument("--model", required=True, help="model directory or Hugging Face id")
    io.add_argument("--train", required=True, type=Path, help="JSONL: {prompt, response} or {text}")
    io.add_argument("--val-file", type=Path, help="validation JSONL (else --val-fraction)")
    io.add_argument("--val-fraction", type=float, default=_D.val_fraction,
                    help="share of --train held out for validation when no --val-file")
    io.add_argument("--output", "-o", required=True, type=Path, help="artifact file to write")
    io.add_argument("--name", help="prefix name (default: the output file's stem)")
    io.add_argument("--description", default="", help="the prefix's description in the registry")
    io.add_argument("--chat-template", action="store_true",
                    help="wrap each prompt as the user turn of the tokenizer's chat template")
    io.add_argument("--max-length", type=int, default=_D.max_length, help="text tokens/example")
    io.add_argument("--no-eos", dest="append_eos", action="store_false",
                    help="don't end each response with EOS (by default each one does, so the "
                         "prefix learns to stop)")
    pre = p.add_argument_group("prefix")
    pre.add_argument("--prefix-len", type=int, default=_D.prefix_len,
                     help="virtual tokens of the prefix")
    pre.add_argument("--init", choices=INITS, default=_D.init,
                     help="words: start from the embeddings of --init-text; random: N(0, "
                          "--init-std)")
    pre.add_argument("--init-text", default=_D.init_text, help="text whose embeddings init P")
    pre.add_argument("--init-std", type=float, default=_D.init_std,
                     help="standard deviation of --init random")
    pre.add_argument("--reparam", choices=REPARAMS, default=_D.reparam,
                     help="mlp: Li & Liang's MLP reparameterisation (collapsed on export)")
    pre.add_argument("--mlp-hidden", type=int, default=_D.mlp_hidden,
                     help="hidden width of --reparam mlp")
    _add_optim_args(p)
    _add_run_args(p)
    _short_metavars(p)
    return p


def _short_metavars(parser: argparse.ArgumentParser) -> None:
    """`--lr X`, `--epochs N`, `--train FILE` rather than `--lr LR`, `--epochs EPOCHS`."""
    short = {int: "N", float: "X", Path: "FILE"}
    for action in parser._actions:
        if action.metavar is None and action.type in short and action.option_strings:
            action.metavar = "DIR" if action.dest.endswith("_dir") else short[action.type]


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_D.epochs, help="passes over the training data")
    g.add_argument("--max-steps", type=int, default=_D.max_steps,
                   help="optimizer steps; 0: use --epochs")
    g.add_argument("--batch-size", type=int, default=_D.batch_size, help="examples per step")
    g.add_argument("--grad-accum", type=int, default=_D.grad_accum,
                   help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW's")
    g.add_argument("--max-grad-norm", type=float, default=_D.max_grad_norm,
                   help="clip gradients to this norm; 0: no clipping")
    g.add_argument("--schedule", choices=SCHEDULES, default=_D.schedule,
                   help="learning-rate decay after the warm-up")
    g.add_argument("--warmup-steps", type=int, default=_D.warmup_steps,
                   help="linear warm-up steps; 0: use --warmup-ratio")
    g.add_argument("--warmup-ratio", type=float, default=_D.warmup_ratio,
                   help="warm-up as a share of all steps")
    g.add_argument("--min-lr-ratio", type=float, default=_D.min_lr_ratio,
                   help="the decay ends at lr x this")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation, checkpoints, runtime, upload")
    g.add_argument("--eval-every", type=int, default=_D.eval_every,
                   help="optimizer steps between validations; 0: once per epoch")
    g.add_argument("--patience", type=int, default=_D.patience,
                   help="validations without improvement before stopping; 0: never stop early")
    g.add_argument("--min-delta", type=float, default=_D.min_delta,
                   help="smallest val loss drop that counts as an improvement")
    g.add_argument("--checkpoint-dir", type=Path, help="write resumable checkpoints here")
    g.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every,
                   help="optimizer steps between checkpoints; 0: only at the end")
    g.add_argument("--keep-checkpoints", type=int, default=_D.keep_checkpoints,
                   help="newest checkpoints kept")
    g.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from --checkpoint-dir's latest")
    g.add_argument("--seed", type=int, default=_D.seed, help="data order and initialisation")
    g.add_argument("--precision", choices=PRECISIONS, default=_D.precision,
                   help="autocast; auto: bf16 on a CUDA device that has it, else fp32")
    g.add_argument("--dtype", default=_D.dtype, help="weights' dtype: float32|bfloat16|float16")
    g.add_argument("--device", default=_D.device, help="auto|cpu|cuda|cuda:N")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0: torch's default (on a shared CPU, 1 is "
                        "often much faster)")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    g.add_argument("--upload", metavar="URL", help="upload the artifact to this server")
    g.add_argument("--api-key", help="key for --upload (default: $PREFIX_SERVE_API_KEY)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's `TrainConfig` from parsed flags (raises TrainConfigError on bad values)."""
    resume: Path | None = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else args.checkpoint_dir
        if resume is None:
            raise TrainConfigError("--resume without a path needs --checkpoint-dir")
    names = set(TrainConfig.__dataclass_fields__) - {"resume_from", "betas"}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(**values, resume_from=resume)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported after parsing: torch and the model code take seconds to import.
    from clients import PrefixServeError, UploadSourceError
    from prefix_registry.errors import RegistryError
    from prefix_registry.validation import validate_name
    from server.models.loader import ModelLoadError
    from server.training.checkpoint import CheckpointError
    from server.training.data import DataError

    try:
        config = config_from_args(args)
        name = validate_name(args.name or args.output.stem)
    except (TrainConfigError, RegistryError) as exc:
        parser.error(str(exc))
    try:
        return _run(args, config, name)
    except (DataError, TrainConfigError, CheckpointError, ModelLoadError, RegistryError,
            PrefixServeError, UploadSourceError) as exc:
        return _fail(getattr(exc, "message", None) or str(exc))


def _fail(message: str) -> int:
    print(f"prefix-train: error: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace, config: TrainConfig, name: str) -> int:
    import torch

    from server.models.loader import load_model
    from server.training.export import save_artifact, to_artifact
    from server.training.loop import train_prefix

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=config.dtype, device=config.device)
    result = train_prefix(loaded, args.train, config=config, val_data=args.val_file)
    artifact = to_artifact(result, loaded.fingerprint, name=name, description=args.description)
    path = save_artifact(artifact, args.output)
    print(result.summary())
    print(f"wrote {path} ({artifact.meta.size_bytes} bytes, sha256 {artifact.meta.sha256[:12]})")
    return _upload(args, path, name) if args.upload else 0


def _upload(args: argparse.Namespace, path: Path, name: str) -> int:
    """Upload the written artifact; on failure say where it is and how to upload it later."""
    from clients import PrefixServeError
    from server.training.export import upload_artifact

    try:
        info: Any = upload_artifact(path, base_url=args.upload, name=name, api_key=args.api_key,
                                    description=args.description)
    except PrefixServeError as exc:
        return _fail(
            f"could not upload to {args.upload}: {exc.message}. The artifact was kept at {path}; "
            f"upload it later with: prefixctl --base-url {args.upload} --api-key KEY upload {name} "
            f"{path}"
        )
    print(f"uploaded as {info.name}@{info.version} to {args.upload}")
    return 0
