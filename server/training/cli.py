"""`prefix-train`: train a prefix on a JSONL file, write a registry artifact, optionally upload it.

    prefix-train --model ./my-model --train data.jsonl --val-fraction 0.1 \\
        --prefix-len 10 --init words --init-text "Answer politely:" \\
        --output formal.safetensors --name formal [--upload http://127.0.0.1:8000 --api-key KEY]

See docs/training.md for every option. Exit status: 0 done, 1 the run failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from clients import PrefixServeError, UploadSourceError
from prefix_registry.errors import RegistryError
from prefix_registry.validation import validate_name
from server.models.loader import ModelLoadError, load_model
from server.training.checkpoint import CheckpointError
from server.training.config import (
    INITS,
    PRECISIONS,
    REPARAMS,
    SCHEDULES,
    TrainConfig,
    TrainConfigError,
)
from server.training.data import DataError
from server.training.export import save_artifact, to_artifact, upload_artifact
from server.training.loop import train_prefix

_D = TrainConfig()  # the defaults shown in --help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prefix-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a Prefix-Tuning prefix for a frozen model on a JSONL file, write it "
                    "as a registry artifact, and optionally upload it to a prefix-serve server.")
    io = p.add_argument_group("model, data and output")
    io.add_argument("--model", required=True, help="model directory or Hugging Face id")
    io.add_argument("--train", required=True, type=Path, help="JSONL: {prompt, response} or {text}")
    io.add_argument("--val-file", type=Path, help="validation JSONL (else --val-fraction)")
    io.add_argument("--val-fraction", type=float, default=_D.val_fraction)
    io.add_argument("--output", "-o", required=True, type=Path, help="artifact file to write")
    io.add_argument("--name", help="prefix name (default: the output file's stem)")
    io.add_argument("--description", default="")
    io.add_argument("--chat-template", action="store_true",
                    help="wrap each prompt as the user turn of the tokenizer's chat template")
    io.add_argument("--max-length", type=int, default=_D.max_length, help="text tokens/example")
    io.add_argument("--no-eos", dest="append_eos", action="store_false",
                    help="don't end each response with EOS")
    pre = p.add_argument_group("prefix")
    pre.add_argument("--prefix-len", type=int, default=_D.prefix_len)
    pre.add_argument("--init", choices=INITS, default=_D.init)
    pre.add_argument("--init-text", default=_D.init_text, help="text whose embeddings init P")
    pre.add_argument("--init-std", type=float, default=_D.init_std)
    pre.add_argument("--reparam", choices=REPARAMS, default=_D.reparam,
                     help="mlp: Li & Liang's MLP reparameterisation (collapsed on export)")
    pre.add_argument("--mlp-hidden", type=int, default=_D.mlp_hidden)
    _add_optim_args(p)
    _add_run_args(p)
    return p


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=_D.epochs)
    g.add_argument("--max-steps", type=int, default=_D.max_steps, help="0: use --epochs")
    g.add_argument("--batch-size", type=int, default=_D.batch_size)
    g.add_argument("--grad-accum", type=int, default=_D.grad_accum)
    g.add_argument("--lr", type=float, default=_D.lr)
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    g.add_argument("--max-grad-norm", type=float, default=_D.max_grad_norm, help="0: no clip")
    g.add_argument("--schedule", choices=SCHEDULES, default=_D.schedule)
    g.add_argument("--warmup-steps", type=int, default=_D.warmup_steps)
    g.add_argument("--warmup-ratio", type=float, default=_D.warmup_ratio)
    g.add_argument("--min-lr-ratio", type=float, default=_D.min_lr_ratio)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation, checkpoints, runtime, upload")
    g.add_argument("--eval-every", type=int, default=_D.eval_every, help="0: once per epoch")
    g.add_argument("--patience", type=int, default=_D.patience, help="0: no early stopping")
    g.add_argument("--min-delta", type=float, default=_D.min_delta)
    g.add_argument("--checkpoint-dir", type=Path)
    g.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every)
    g.add_argument("--keep-checkpoints", type=int, default=_D.keep_checkpoints)
    g.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from --checkpoint-dir's latest")
    g.add_argument("--seed", type=int, default=_D.seed)
    g.add_argument("--precision", choices=PRECISIONS, default=_D.precision)
    g.add_argument("--dtype", default=_D.dtype, help="weights' dtype: float32|bfloat16|float16")
    g.add_argument("--device", default=_D.device, help="auto|cpu|cuda|cuda:N")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0: its default")
    g.add_argument("--no-progress", dest="progress", action="store_false")
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
    try:
        config = config_from_args(args)
        name = validate_name(args.name or args.output.stem)
    except (TrainConfigError, RegistryError) as exc:
        parser.error(str(exc))
    try:
        return _run(args, config, name)
    except (DataError, TrainConfigError, CheckpointError, ModelLoadError, RegistryError,
            PrefixServeError, UploadSourceError) as exc:
        print(f"prefix-train: error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, config: TrainConfig, name: str) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=config.dtype, device=config.device)
    result = train_prefix(loaded, args.train, config=config, val_data=args.val_file)
    artifact = to_artifact(result, loaded.fingerprint, name=name, description=args.description)
    path = save_artifact(artifact, args.output)
    print(result.summary())
    print(f"wrote {path} ({artifact.meta.size_bytes} bytes, sha256 {artifact.meta.sha256[:12]})")
    if args.upload:
        info = upload_artifact(path, base_url=args.upload, name=name, api_key=args.api_key,
                               description=args.description)
        print(f"uploaded as {info.name}@{info.version} to {args.upload}")
    return 0
