"""captioner: Show, Attend and Tell image captioning, offline on a CPU."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import captioner` stays cheap for the CLI and the data tools.
    if name == "Captioner":
        from captioner.apps.api import Captioner
        return Captioner
    raise AttributeError(name)
