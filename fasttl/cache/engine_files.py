"""The graph files an ONNX Runtime engine keeps beside the caches it extracted (engine_dir): read
back within a size bound, written atomically, and int8 graphs no cache records removed."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

from fasttl.util import files

# An exported graph of these backbones is 4 to 30 MB; a kept file larger than this is no graph
# fasttl wrote (a sparse file of gigabytes would otherwise be read whole): exported anew.
MAX_ENGINE_BYTES = 1 << 30


def read_engine_file(path: str) -> Optional[bytes]:
    from fasttl.cache import store

    try:
        if store.regular_file(path) is None:
            return None
        with store.open_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_ENGINE_BYTES:
                return None
            return f.read(MAX_ENGINE_BYTES + 1)
    except (OSError, store.CacheError):
        return None


def remove_unrecorded_int8_graphs(engine_dir: str, keep: str) -> list:
    """Removes the int8 graphs in `engine_dir` that no cache in its subfolders records, `keep` (the
    graph a build just used) aside: each is keyed by its calibration sample, so every change of the
    data leaves the last one behind (a few MB per split and change). A cache kept elsewhere that
    used a removed graph quantizes it again when it needs it. fp32 graphs are keyed by the backbone
    alone and kept. Returns the names removed."""
    import json
    import re

    from fasttl.cache import store

    try:
        names = os.listdir(engine_dir)
    except OSError:
        return []
    recorded = {keep}
    for name in names:
        try:
            with open(os.path.join(engine_dir, name, store.MANIFEST), "rb") as f:
                graph = json.loads(f.read(1 << 24)).get("engine_graph") or {}
            graph_file = graph.get("file")
        except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested 100,000 deep
            continue  # not a cache, or one without a graph
        if isinstance(graph_file, str):  # a damaged manifest (a list, an object there) records nothing
            recorded.add(graph_file)
    stale = [name for name in names if re.fullmatch(r"engine-[0-9a-f]{16}-int8\.onnx", name) and name not in recorded]
    for name in stale:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(engine_dir, name))  # fasttl's own name; a link is removed, never followed
    return stale


def write_engine_file(path: str, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a read-only cache folder: export again next time
        files.write_atomic(path, data)
