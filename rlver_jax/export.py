"""Training checkpoint -> Hugging Face directory.

    python -m rlver_jax.export --workdir DIR [--step N] --out DIR [--model policy|critic]
        [--dtype float32|bfloat16] [--overwrite] [--max_shard_size 5GB] [--tokenizer SPEC]

The checkpoints are read through `rlver_jax.workdir_models`, which describes what training
writes.

Checkpoints hold the float32 master weights; `--dtype` casts them on the way out and
defaults to the dtype the weights came in (`export_dtype`: bfloat16 for Qwen2.5; older
checkpoints without it: their stored dtype).

The output directory holds config.json, safetensors shards (+ index), generation_config.json
and the tokenizer files with the ChatML template, so `AutoModelForCausalLM.from_pretrained`
(policy) or `AutoModelForTokenClassification.from_pretrained` (critic: backbone +
`score.weight`) and `AutoTokenizer.from_pretrained` load it. Files are written into a
temporary sibling directory and moved into place at the end, so an interrupted export never
leaves a half-written model under the output name. `--workdir` and `--out` may be gs:// URLs
(an `--out` URL is written locally first, then uploaded file by file).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Sequence

import jax

from rlver_jax import storage
from rlver_jax.models.hf_io import DEFAULT_MAX_SHARD_BYTES, save_hf
from rlver_jax.sharding import make_mesh
from rlver_jax.workdir_models import CHECKPOINT_SUBDIR, MODELS, WorkdirError, \
    load_model_from_workdir

log = logging.getLogger(__name__)

class ExportError(ValueError):
    """The workdir, step or output directory cannot be used as asked."""


# ------------------------------------------------------------------------------ export
def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2 * 2**30, '800MB', '1000' (bytes); as transformers."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"bad size {text!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    number, unit = float(m.group(1)), m.group(2)
    if unit.endswith("IB"):
        scale = 1024 ** ("KMGT".index(unit[0]) + 1)
    elif unit and unit[0] in "KMGT":
        scale = 1000 ** ("KMGT".index(unit[0]) + 1)
    else:
        scale = 1
    size = int(number * scale)
    if size <= 0:
        raise ValueError(f"bad size {text!r}: must be positive")
    return size


def _check_out_dir(out: str, workdir: str, overwrite: bool) -> None:
    if storage.is_remote(out) or storage.is_remote(workdir):
        out_real, work_real = out.rstrip("/"), workdir.rstrip("/")
    else:
        out_real, work_real = os.path.realpath(out), os.path.realpath(workdir)
    if out_real == work_real or work_real.startswith(out_real + os.sep):
        raise ExportError(f"output directory {out} would contain the workdir {workdir}; "
                          "choose another --out")
    ckpt_real = os.path.join(work_real, CHECKPOINT_SUBDIR)
    if out_real == ckpt_real or out_real.startswith(ckpt_real + os.sep):
        raise ExportError(f"output directory {out} is inside the checkpoint directory")
    out_path = storage.path(out)
    if out_path.exists():
        if not out_path.is_dir():
            raise ExportError(f"output path {out} exists and is not a directory")
        if any(out_path.iterdir()) and not overwrite:
            raise ExportError(f"output directory {out} is not empty; pass --overwrite to "
                              "replace its contents")


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                   model: str = "policy", dtype: str | None = None, overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   tokenizer: str | None = None, mesh=None) -> list[str]:
    """Writes the policy or critic of a training checkpoint as an HF directory.

    `dtype` defaults to the dtype the weights came in (the checkpoint meta's
    `export_dtype`, else the stored dtype); `tokenizer` overrides the spec
    stored in the checkpoint. Returns the written file names (relative to `out`).
    """
    return _export(workdir, out, step, model, dtype, overwrite, max_shard_bytes, tokenizer,
                   mesh)[1]


def _export(workdir, out, step, model, dtype, overwrite, max_shard_bytes, tokenizer, mesh
            ) -> tuple[int, list[str]]:
    workdir, out = os.fspath(workdir), os.fspath(out)
    if model not in MODELS:
        raise ExportError(f"--model={model!r}: expected one of {sorted(MODELS)}")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype={dtype!r}: expected float32, bfloat16 or float16")
    _check_out_dir(out, workdir, overwrite)
    try:
        step, config, module, meta = load_model_from_workdir(model, workdir, step, mesh)
    except WorkdirError as e:
        raise ExportError(str(e)) from e
    dtype = dtype or meta[MODELS[model][1]].get("export_dtype") or config.param_dtype
    log.info("exporting %s of step %d from %s in %s", model, step, workdir, dtype)

    from rlver_jax.tokenizer import load_chat_tokenizer
    spec = tokenizer or meta.get("tokenizer")
    tok = None
    if spec:
        try:
            tok = load_chat_tokenizer(spec)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(f"cannot load the checkpoint's tokenizer {spec!r}: {e}; pass "
                              "--tokenizer to use another") from e
    generation = {}
    if tok is not None:
        # The policy ends its turns with <|im_end|>; sampling must stop there.
        generation = {"eos_token_id": list(tok.eos_ids), "pad_token_id": tok.pad_id}

    # Written next to `out` and renamed at the end: an interrupted export leaves no
    # half-written model under the final name. The name is fixed so that every process of
    # a multi-host export agrees on it (only process 0 writes files). A remote `out` is
    # staged in a local directory of the same fixed name under the system temp dir.
    remote = storage.is_remote(out)
    out_abs = out if remote else os.path.abspath(out)
    tmp = (os.path.join(tempfile.gettempdir(), "rlver_jax-export-" + re.sub(
        r"[^\w.-]", "_", out.rstrip("/"))) if remote else out_abs.rstrip(os.sep)) + ".export-tmp"
    writer = jax.process_index() == 0
    if writer and os.path.exists(tmp):
        shutil.rmtree(tmp)
    files = save_hf(module, config, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes,
                    generation_config=generation)
    if not writer:
        return step, files
    if tok is not None:
        before = set(os.listdir(tmp))
        tok.save_pretrained(tmp)
        files += sorted(set(os.listdir(tmp)) - before)
    if remote:
        # Object stores have no rename of a directory: upload, then drop the local copy.
        if storage.path(out).exists():
            storage.path(out).rmtree()
        storage.copy_tree(tmp, out)
        shutil.rmtree(tmp)
    elif os.path.exists(out_abs):
        old = out_abs.rstrip(os.sep) + ".export-old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(out_abs, old)
        os.rename(tmp, out_abs)
        shutil.rmtree(old)
    else:
        os.makedirs(os.path.dirname(out_abs), exist_ok=True)
        os.rename(tmp, out_abs)
    return step, files


# --------------------------------------------------------------------------------- CLI
def _define_flags():
    # A private FlagValues: evaluate.py / train.py import this module and define their own
    # --workdir; absl's global registry would reject the duplicate.
    from absl import flags
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "training workdir or gs:// URL (holds checkpoints/)",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "output HF directory (or gs:// URL)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
    flags.DEFINE_enum("model", "policy", sorted(MODELS), "which model to export", flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                      "weight dtype (default: the dtype the weights came in)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a non-empty output directory", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors file (5GB, 2GiB, ...)",
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer spec overriding the checkpoint's "
                        "('tiny', 'qwen2.5', an HF tokenizer directory or a hub id)",
                        flag_values=fv)
    flags.DEFINE_string("mesh", "", "load sharded on a (data,fsdp,tensor) mesh, e.g. '1,-1,1' "
                        "(default: one device)", flag_values=fv)
    flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)
    return fv


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 export error, 2 usage error)."""
    from absl import flags
    argv = list(sys.argv if argv is None else argv)
    fv = _define_flags()
    if any(a in ("-h", "--help", "-help") for a in argv[1:]):
        usage = __doc__.strip().split("\n\n")[1]
        print(usage + "\n\n" + fv.get_help(include_special_flags=False))
        return 0
    try:
        rest = fv(argv)
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments: {rest[1:]}")
        max_shard_bytes = parse_size(fv.max_shard_size)
        mesh = None
        if fv.mesh:
            mesh = make_mesh([int(s) for s in fv.mesh.split(",")])
    except (flags.Error, ValueError) as e:
        print(f"usage error: {e}\n\n{fv.get_help(include_special_flags=False)}", file=sys.stderr)
        return 2
    try:
        step, files = _export(fv.workdir, fv.out, fv.step, fv.model, fv.dtype, fv.overwrite,
                              max_shard_bytes, fv.tokenizer, mesh)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        sizes = {f: storage.path(storage.join(fv.out, f)).stat().length for f in files}
        print(f"exported {fv.model} of step {step} from {fv.workdir} to {fv.out}: "
              f"{len(files)} files, {_human(sum(sizes.values()))}")
        for f in files:
            print(f"  {f:40s} {_human(sizes[f]):>10s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
