"""petl_tpr: parameter-efficient transfer learning on transformer backbones, for person retrieval."""

from . import backbones, methods  # noqa: F401  (registers built-in families and methods)
from .api import aux_loss, eject, inject, merge
from .backbones.discover import discover
from .errors import CheckpointError, DiscoveryError, InjectionError, InputError, PetlError, SpecError, UnsupportedError
from .integrations.hf import from_pretrained, save_pretrained
from .interop.peft import export_peft
from .io import adapter_state_dict, load_adapters, save_adapters
from .spec import MethodEntry, Spec, Where
from .summary import summary
from .switch import activate, active_sets, adapter_sets, disabled, per_sample, set_trainable

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "DiscoveryError", "InjectionError", "InputError", "MethodEntry", "PetlError", "Spec", "SpecError",
    "UnsupportedError", "Where",
    "activate", "active_sets", "adapter_sets", "adapter_state_dict", "aux_loss", "disabled", "per_sample", "discover", "eject", "export_peft", "from_pretrained", "inject", "load_adapters",
    "merge", "save_adapters", "save_pretrained", "set_trainable", "summary",
]
