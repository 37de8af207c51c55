"""Reading torch pickles from files we did not write: tensors and plain containers only."""

import torch


def load_weights_only(path: str):
    """`torch.load(path, weights_only=True)` on the CPU (memory-mapped where the file allows): tensors, dicts, lists,
    numbers and strings load; a pickle naming any other class (e.g. one whose `__reduce__` would run code) is
    refused with one line naming the file, before anything in it runs."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} was refused: not a plain tensor file ({type(e).__name__}: {first})") from None
