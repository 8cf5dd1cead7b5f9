"""Exception types. Every error the toolkit raises on bad input is one of these."""


class PetlError(Exception):
    """Base class of the toolkit's errors."""


class SpecError(PetlError, ValueError):
    """A spec names something unknown, is malformed, or its selectors match nothing."""


class DiscoveryError(PetlError):
    """No transformer block of a known family was found in a model."""


class InjectionError(PetlError):
    """Attaching a method failed (conflicting sites, unsupported storage...)."""


class CheckpointError(PetlError):
    """An adapter file is unreadable or does not fit the model it is loaded into."""


class InputError(PetlError, ValueError):
    """A model input does not fit an adapted module (a mask shape the family never produces...)."""


class UnsupportedError(SpecError, InjectionError):
    """A site cannot take what the spec asks for (found at inject, before anything is attached)."""
