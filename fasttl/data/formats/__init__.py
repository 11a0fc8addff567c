"""What `--data` names, beyond class folders: one module per format (folder, filelist,
webdataset, cifar), each making a source of fasttl.data.sources."""
from __future__ import annotations

from typing import Optional

from fasttl.data.formats.filelist import is_file_list, read_file_list
from fasttl.data.labels import read_classes_file
from fasttl.data.formats.webdataset import is_webdataset, read_webdataset


def open_data(data: str, classes_file: Optional[str] = None, labels_kind: str = "names"):
    """What --data names, for inputs beyond class folders: a file list (.csv/.tsv/.parquet) as a
    FileSource, WebDataset shards (.tar pattern) as a TarSource; None for anything else.
    `labels_kind`: a file list's labels are class names, or indices into the classes file
    (WebDataset .cls members are indices by their format). `classes_file`: a path, or the class
    names as a list."""
    if isinstance(classes_file, (list, tuple)):  # the names themselves (a run's recorded classes)
        classes = [str(name) for name in classes_file]
    else:
        classes = read_classes_file(classes_file) if classes_file else None
    if is_file_list(data):
        return read_file_list(data, classes, labels_kind)
    if is_webdataset(data):
        return read_webdataset(data, classes)
    return None
