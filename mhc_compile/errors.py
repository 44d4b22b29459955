"""The backend's own error type, apart from the modules that raise it so that any of them can import it."""


class MHCConversionError(RuntimeError):
    """A graph the pass cannot convert safely (raised under ``strict=True``, warned otherwise), or a setup in which
    the converted model would not be the one the user asked for (e.g. data-parallel training that would leave the
    mHC parameters unsynchronised: ``mhc_compile.distributed``)."""
