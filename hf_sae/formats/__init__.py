"""One module per foreign SAE library, each with its reader (files -> :class:`Raw`), its converter to hf_sae's
parts (``*_to_parts``) and its reference forward (``_ref_*``, the released library's own computation) side by
side. :mod:`hf_sae.convert` holds the table of formats, the SAE builder, ``convert`` / ``verify_conversion`` and
the CLI."""

from ._common import Parts, Raw, RefOutput, hook_point_from_transformerlens, hook_point_to_transformerlens

__all__ = ["Parts", "Raw", "RefOutput", "hook_point_from_transformerlens", "hook_point_to_transformerlens"]
