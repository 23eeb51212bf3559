"""phasesplit: phase-split LLM inference (prompt and token pools) on Kubernetes."""


def __getattr__(name: str):
    """`__version__`, read from the installed package's metadata only when asked for: importing
    importlib.metadata costs every command tens of milliseconds."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib.metadata
    try:
        return importlib.metadata.version(__name__)
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"
