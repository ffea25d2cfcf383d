"""TensorFlow Federated's HDF5 files (the `h5` extra: `pip install 'fedjax-sync[h5]'`).

TFF's HDF5 datasets (`fed_emnist_train.h5`, `shakespeare_train.h5`,
`stackoverflow_train.h5` …) hold one group per client:

    /examples/<client_id>/<feature>     e.g. pixels [n, 28, 28] float32, label [n] int32,
                                        snippets [n] bytes, tokens / title / tags [n] bytes

Clients are read one group at a time (h5py reads a dataset only when indexed), in
the file's order. The test file is found next to the training file by replacing
`train` with `test` in its name.
"""

from __future__ import annotations

import numpy as np

from fedjax_sync.data.examples import sibling_test_file

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


def _h5py():
  try:
    import h5py  # noqa: PLC0415 - optional extra
  except ImportError:
    raise ImportError("reading TFF's HDF5 files needs h5py: pip install 'fedjax-sync[h5]'"
                      ) from None
  return h5py


def client_stream(path: str):
  """`(split -> iterator of (client_id, {feature: array}), has_test)`."""
  h5py = _h5py()
  files = {'train': path, 'test': sibling_test_file(path)}

  def stream(split: str):
    if files.get(split) is None:
      raise KeyError(split)
    with h5py.File(files[split], 'r') as f:
      if 'examples' not in f or not isinstance(f['examples'], h5py.Group):
        raise ValueError("no group /examples (expected /examples/<client_id>/<feature>)")
      for client_id, group in f['examples'].items():
        if not isinstance(group, h5py.Group):
          raise ValueError(f'/examples/{client_id} is not a group of features')
        features = {}
        for name, dataset in group.items():
          values = dataset[()]
          if values.dtype.kind in 'SO':
            flat = np.empty(values.size, dtype=object)
            flat[:] = list(values.reshape(-1))
            values = flat.reshape(values.shape)
          features[name] = values
        yield client_id, features

  return stream, files['test'] is not None
