"""Activations cached on disk as Hugging Face ``datasets`` Arrow shards, and a fast reader.

Layout written by :func:`cache_activations` (``hf-sae cache``)::

    out_dir/
      metadata.json                 run-level: model, hook points, token count, dtype, window, ...
      progress.json                 resume record: windows done, shards with checksums and stats
      windows/shard-00000.arrow     the token windows of each shard (column ``input_ids``
                                    fixed_size_list<int32>[window]) for dashboards / N2G context
      <hook_point>/                 e.g. ``layers.6.resid_post/``; a ``datasets.load_from_disk`` folder
        shard-00000.arrow ...       columns: ``activation`` fixed_size_list<float16|float32|uint16>[d]
                                    (uint16 = bfloat16 bits), ``input_ids`` int32, ``position`` int32,
                                    ``window`` int32 (global window index)
        metadata.json               model, hook_point, d, dtype, num_tokens, mean [d],
                                    mean_sq_norm, input_scale, shards [{file, num_rows, bytes, sha256}]
        state.json, dataset_info.json   (so ``datasets.load_from_disk`` opens the folder)

Every shard holds whole windows, is written to a temporary file and renamed into place, and
only then recorded in ``progress.json`` (itself replaced atomically). A killed run therefore
resumes from the last recorded shard and ends with exactly ``max_tokens`` tokens. On resume
every recorded shard is checked (size + sha256); the first bad one and all after it are
regenerated.

:class:`CachedActivations` reads shards by memory-mapping the Arrow files and viewing the
fixed-size-list child buffer as a ``[rows, d]`` torch tensor (no copy); shuffled batches are
gathered with index permutations over groups of shards. Checksums are verified once per
shard and process, in a background thread ahead of use; a truncated or corrupt shard raises
:class:`CorruptShardError` naming the file.
"""
from __future__ import annotations

import argparse

import torch

from ..cli_args import add_cache_args  # noqa: F401  (the arguments, defined without torch)
from .cache_format import (  # noqa: F401  (the cache API, re-exported)
    _ARROW_CHILD,
    _DTYPES,
    _NP,
    FORMAT_VERSION,
    META_CHECKSUM,
    CorruptMetadataError,
    CorruptShardError,
    _atomic_write_bytes,
    _atomic_write_json,
    _check_shard_file,
    _check_shard_schema,
    _dtype_name,
    _features,
    _fix_hint,
    _fixed_list,
    _hook_dir_name,
    _load_hook_meta,
    _meta_digest,
    _read_json,
    _serialize,
    _sha256_file,
    _with_checksum,
    norm_stats_to_input_scale,
)
from .cache_reader import CachedActivations, _Failure, _find_meta, load_windows  # noqa: F401
from .cache_writer import (  # noqa: F401
    _clean_unrecorded,
    _finalize,
    _fingerprint,
    _model_name,
    _open_run,
    _shard_loop,
    _ShardBuffer,
    _ShardWriter,
    _verify_progress,
    cache_activations,
    write_activations,
)

# --------------------------------------------------------------------------- CLI: `hf-sae cache`
# add_cache_args lives in hf_sae.cli_args (no torch import for `hf-sae cache --help`).


def run_cache(args: argparse.Namespace) -> dict:
    """Execute ``hf-sae cache`` from parsed arguments; prints a summary and returns the metadata."""
    from .models import load_model

    hooks = [h for item in args.hook_points for h in item.split(",") if h]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype=_DTYPES[args.model_dtype], device=device, device_map=args.device_map,
                            max_memory=args.max_memory, offload_folder=args.offload_folder)
    meta = cache_activations(
        model,
        tok,
        args.dataset,
        hooks,
        args.out,
        args.max_tokens,
        dtype=args.dtype,
        batch_windows=args.batch_windows,
        shard_tokens=args.shard_tokens,
        resume=args.resume,
        window=args.window,
        add_bos=not args.no_bos,
        exclude_first=not args.keep_first,
        exclude_special=not args.keep_special,
        split=args.split,
        text_column=args.text_column,
        overwrite=args.overwrite,
    )
    print(f"cached {meta['num_tokens']} tokens x {len(hooks)} hook point(s) of {meta['model']} in {args.out}")
    for h, m in meta["per_hook_point"].items():
        print(f"  {h}: d={m['d']} E||x||^2={m['mean_sq_norm']:.4g} input_scale={m['input_scale']:.4g}")
    return meta


def cache_main(argv=None) -> dict:
    """Entry point: ``python -m hf_sae.data.cache --hook-points ... --out ...`` (same as ``hf-sae cache``)."""
    parser = argparse.ArgumentParser(prog="hf-sae cache", description="Cache LM activations as Arrow shards.")
    add_cache_args(parser)
    return run_cache(parser.parse_args(argv))


if __name__ == "__main__":
    cache_main()
