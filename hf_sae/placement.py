"""Where a language model's weights go: accelerate's big-model placement options, parsed and checked.

Kept free of torch/transformers imports, so that argument parsers (``hf-sae ... --help``) stay fast;
:func:`hf_sae.data.models.load_model` applies them.
"""

from __future__ import annotations


def parse_max_memory(spec) -> dict | None:
    """``"cpu=2GiB,0=70GiB"`` -> ``{"cpu": "2GiB", 0: "70GiB"}`` (the ``max_memory`` of
    ``from_pretrained``): the most weight bytes each device may hold; what does not fit goes to the next
    device, then to the CPU, then to ``offload_folder`` on disk. A dict passes through; None stays None."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict = {}
    for item in str(spec).split(","):
        dev, eq, size = item.strip().partition("=")
        dev, size = dev.strip(), size.strip()
        if not eq or not dev or not size:
            raise ValueError(f"--max_memory {spec!r}: write device=size pairs separated by commas, e.g. "
                             "'cpu=2GiB' or '0=70GiB,1=70GiB,cpu=200GiB' (a GPU index or cpu/mps; sizes such as "
                             "200MB, 2GiB)")
        key = int(dev) if dev.isdigit() else dev
        if not (isinstance(key, int) or key in ("cpu", "mps", "disk")):
            raise ValueError(f"--max_memory {spec!r}: unknown device {dev!r}; use a GPU index (0, 1, ...), cpu or mps")
        out[key] = int(size) if size.isdigit() else size
    return out


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strategies accepted by name (a dict {module name: device} is accepted from Python)."""


def check_device_map(device_map) -> None:
    """A clear error for a ``device_map`` that is neither None, a dict, nor one of :data:`DEVICE_MAPS`."""
    if device_map is not None and not isinstance(device_map, dict) and device_map not in DEVICE_MAPS:
        raise ValueError(f"--device_map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)} "
                         "(or pass a dict {module name: device} from Python)")


def add_placement_args(parser, dashes: bool = False):
    """Add ``--device_map``, ``--max_memory`` and ``--offload_folder`` (the LM's big-model placement,
    passed to :func:`hf_sae.data.models.load_model`) to an argparse ``parser``; ``dashes`` adds the
    ``--device-map`` spellings too."""
    for name, help_ in PLACEMENT_HELP.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if dashes else [])
        parser.add_argument(*flags, dest=name, default=None, help=help_)
    return parser


PLACEMENT_HELP = {
    "device_map": "load the LM through accelerate's big-model path: 'auto' spreads its layers over the visible "
                  "GPUs, then the CPU, then disk (see --max_memory); default: the whole LM on one device",
    "max_memory": "with --device_map: the most LM weight bytes per device, e.g. 'cpu=2GiB' or "
                  "'0=70GiB,1=70GiB,cpu=200GiB'; layers that do not fit are offloaded",
    "offload_folder": "with --device_map: folder for the weights offloaded to disk (default: a temporary folder)",
}
"""Help of the LM placement options, shared by the argparse commands and SAETrainingArguments."""
