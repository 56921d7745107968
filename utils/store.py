"""One checked store (the teacher feature cache, a cache build's shards, the evaluation feature cache): ``.npy``
arrays, each written atomically, then the JSON sidecar that describes them (arrays without one are an interrupted
write); a read checks the sidecar is there and the arrays' shapes and dtypes."""
import json
import os

import numpy as np

from utils.checkpoint import write_atomic, write_file_atomic


class StoreMismatch(ValueError):
    """Arrays that are not what their sidecar says (an interrupted or damaged write)."""


def sidecar_path(npy_path):
    return os.path.splitext(npy_path)[0] + '.json'


def differing(recorded, expected, keys=None):
    """The keys (default: all of ``expected``) whose recorded value is not the expected one."""
    return [key for key in (expected if keys is None else keys) if recorded.get(key) != expected[key]]


class Store:
    """The arrays ``{name: path of its .npy}`` described by the JSON file ``sidecar``."""

    def __init__(self, sidecar, arrays):
        self.sidecar, self.arrays = sidecar, arrays

    def exists(self):
        return os.path.isfile(self.sidecar)

    def meta(self):
        with open(self.sidecar) as f:
            return json.load(f)

    def open(self, shapes, mmap=True):
        """{name: array} (memory-mapped, or read) for each ``name: (shape, dtype)`` of ``shapes``, None in a
        shape meaning any size; StoreMismatch names the first array of another shape or dtype."""
        arrays = {}
        for name, (shape, dtype) in shapes.items():
            array = np.load(self.arrays[name], mmap_mode='r' if mmap else None)
            if (array.dtype != dtype or array.ndim != len(shape)
                    or any(want not in (None, got) for want, got in zip(shape, array.shape))):
                raise StoreMismatch(f'{self.arrays[name]} holds {array.dtype} {array.shape}, its sidecar says '
                                    f'{np.dtype(dtype)} {tuple(shape)}')
            arrays[name] = array
        return arrays

    def write_arrays(self, arrays):
        """``{name: array, or a list of blocks to concatenate}``, each atomically, after removing the sidecar
        and the arrays not written: new arrays never meet an old sidecar."""
        for path in [self.sidecar] + [path for name, path in self.arrays.items() if name not in arrays]:
            if os.path.exists(path):
                os.remove(path)
        for name, array in arrays.items():
            save_blocks_atomic(array if isinstance(array, list) else [array], self.arrays[name])

    def write_meta(self, meta):
        write_file_atomic(json.dumps(meta, indent=2) + '\n', self.sidecar)

    def write(self, arrays, meta):
        self.write_arrays(arrays)
        self.write_meta(meta)


def save_blocks_atomic(blocks, path):
    """The ``.npy`` of ``blocks`` concatenated along their first axis, one block in memory at a time, atomically."""
    dtype = blocks[0].dtype
    header = {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
              'shape': (sum(len(block) for block in blocks), *blocks[0].shape[1:])}

    def write(f):
        np.lib.format.write_array_header_1_0(f, header)
        for block in blocks:
            f.write(memoryview(np.ascontiguousarray(block, dtype=dtype)))
    write_atomic(path, 'wb', write)
