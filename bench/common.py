"""Shared by the bench scripts: the repo on sys.path, and one grouped batch of grid questions."""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import make_grid_data  # noqa: E402


def grid_group_samples(cell, batch_size):
    """Up to `batch_size` samples of one training group (obj1 fixed, obj2 moving), drawn with
    `cell` px cells into a temporary folder."""
    folder = Path(tempfile.mkdtemp())
    objects = make_grid_data.builtin_objects()
    make_grid_data.make_grid_images(folder, {k: objects[k] for k in list(objects)[:2]}, cell=cell,
                                    sizes=(124,), max_pairs=1, max_images=15, progress=False)
    samples = data.GridDataset(folder).samples
    group = next(iter(data.group_indices(samples, range(len(samples))).values()))[:batch_size]
    return [samples[i] for i in group]
