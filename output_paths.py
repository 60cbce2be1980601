"""Whether an output path can be written, checked before any long work starts, so that a path
under a regular file (`--out some_file/ids.pt`) or in a read-only folder is one line naming the
flag, not a traceback after the model has run."""
import os
from pathlib import Path


def output_problem(path, kind="file"):
    """None when `path` can be written as a `kind` ("file" or "folder"), creating the folders
    above it as needed; otherwise what is in the way, naming the part of the path at fault."""
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            return f"{path} is a folder, not a file"
        if kind == "folder" and not path.is_dir():
            return f"{path} is a file, not a folder"
    for part in [path, *path.absolute().parents][1 if kind == "file" else 0:]:
        if part.exists():
            if not part.is_dir():
                return f"{part} is a file, not a folder, so nothing can be written under it"
            if not os.access(part, os.W_OK | os.X_OK):
                return f"{part} is not writable"
            return None
    return None
