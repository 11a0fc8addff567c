"""`fasttl bench`: runs the named benchmarks, prints their tables, writes JSON and a plot."""
from __future__ import annotations

import importlib
import io
import os
from typing import Dict, List, Optional, Tuple

from fasttl.bench.common import header, machine, save_json
from fasttl.util.checks import torch_device
from fasttl.util.files import write_atomic

# name -> module in fasttl.bench with run(device, quick), table(result) and speedups(result)
BENCHMARKS = {
    "distill": "fasttl.bench.distill",
    "adam": "fasttl.bench.adam",
    "data": "fasttl.bench.data",
    "extract": "fasttl.bench.extract",
    "cache": "fasttl.bench.cache",
    "e2e": "fasttl.bench.e2e",
}


def run(names: List[str], device: str = "cpu", quick: bool = False, json_path: Optional[str] = None,
        plot_path: Optional[str] = None, e2e_subset: Optional[Tuple[int, int]] = None,
        scale: bool = False) -> Dict[str, object]:
    """`e2e_subset`: (train, test) images per class for e2e instead of its default; `scale`: the
    cache benchmark's at-scale mode."""
    if names == ["all"]:
        names = list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"benchmark: unknown {unknown}; choose from {sorted(BENCHMARKS)} or 'all'")
    _check_outputs(json_path, plot_path)  # before the benchmarks, not after minutes of them
    torch_device(device)
    info = machine()
    print(header(info, device), flush=True)
    results = []
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        options = {}
        if name == "e2e" and e2e_subset:
            options = {"per_class": e2e_subset[0], "test_per_class": e2e_subset[1]}
        if name == "cache" and scale:
            options = {"scale": True}
        result = module.run(device=device, quick=quick, **options)
        result["table"] = module.table(result)
        print(f"\n## {name}\n\n{result['table']}", flush=True)
        results.append(result)
    payload = {"machine": info, "device": device, "quick": quick, "results": results}
    # an earlier bench output is replaced, as checked before the benchmarks; a file made there since is kept
    save_json(json_path, payload, replace=bool(json_path) and _earlier_output(json_path, "json"))
    if plot_path:
        plot(payload, plot_path, replace=_earlier_output(plot_path, "plot"))
    return payload


PLOT_FORMATS = (".png", ".svg", ".pdf")


PLOT_TITLE = "fasttl bench speedups"  # written into each plot's metadata (PNG tEXt, PDF info, SVG title)
_PLOT_BYTES = 64 << 20  # a bench plot is well under a megabyte


def _earlier_output(path: str, option: str) -> bool:
    """Whether the file at `path` is one bench wrote: a JSON object with its machine and results,
    or a plot file of one of its formats (a user's notes under that name are never replaced)."""
    import json

    from fasttl.util import files

    try:
        data = files.read_plain(path, _PLOT_BYTES if option == "plot" else files.MAX_JSON_BYTES)
    except (OSError, ValueError):
        return False
    if option == "plot":  # bench's title in the field bench writes; any other picture or document is yours
        return _plot_of_bench(path, data)
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    return isinstance(payload, dict) and {"machine", "results"} <= set(payload)


def _plot_of_bench(path: str, data: bytes) -> bool:
    """Whether `data` is a plot matplotlib wrote for bench: its title in the metadata field of the
    format (PNG tEXt "Title", the PDF's Info /Title, the SVG's first <title> with matplotlib as the
    creator), not the words anywhere (a slide quoting them is its author's)."""
    title = PLOT_TITLE.encode()
    kind = os.path.splitext(path)[1].lower()
    if kind == ".png":
        return data.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXtTitle\x00" + title in data
    if kind == ".pdf":
        return data.startswith(b"%PDF") and b"/Title (" + title + b")" in data
    head = data[:4096]
    return kind == ".svg" and b"<title>" + title + b"</title>" in head and \
        head.find(b"<title>") == head.find(b"<title>" + title) and b"Matplotlib v" in head


def _check_outputs(json_path: Optional[str], plot_path: Optional[str]) -> None:
    """Both outputs checked before the benchmarks, not after minutes of them: a file in an existing
    folder, replaced when it is a plain file; a link, a device or a FIFO there is refused, never
    replaced by a file (as root, `--json /dev/null` would replace the machine's /dev/null)."""
    from fasttl.cache.folder import refuse_inside
    from fasttl.util.checks import check_output_path
    from fasttl.util.errors import OptionError

    if json_path and plot_path and os.path.realpath(os.path.expanduser(json_path)) == os.path.realpath(
            os.path.expanduser(plot_path)):
        raise OptionError(f"plot: --json and --plot name the same file ({plot_path}); give each its own")
    for option, path in (("json", json_path), ("plot", plot_path)):
        if path is not None and not str(path).strip():
            raise OptionError(f"{option}: an empty path; give --{option} a file name, or leave --{option} out")
        if path:
            path = check_output_path(path, overwrite=True, flag=f"--{option}")
            refuse_inside(option, path, "file")
            if os.path.lexists(path) and not _earlier_output(path, option):
                raise OptionError(f"{option}: {path} exists and is not an earlier fasttl bench {option} output; bench "
                                  f"replaces only its own results: give another --{option}")
    if plot_path and os.path.splitext(plot_path)[1].lower() not in PLOT_FORMATS:
        raise OptionError(f"plot: {plot_path} is not a {', '.join(PLOT_FORMATS)} file; name the plot with one of "
                          "those endings")


def plot(payload: Dict[str, object], path: str, replace: bool = True) -> None:
    """Bar chart of each benchmark's ratios (each module's speedups()), one panel a benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 3.2 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        bars = importlib.import_module(BENCHMARKS[result["name"]]).speedups(result)
        labels, ratios = [label for label, _ in bars], [ratio for _, ratio in bars]
        ax.bar(range(len(ratios)), ratios, color="tab:blue")
        for i, ratio in enumerate(ratios):
            ax.annotate(f"{ratio:.3g}x", (i, ratio), ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8)
        if ratios and max(ratios) > 20 * min(ratios):
            ax.set_yscale("log")  # a 300x bar beside a 1.3x one
        ax.set_xticks(range(len(ratios)), labels, fontsize=7)
        ax.set_ylabel("ratio (x), > 1: fasttl ahead")
        subset = result.get("subset")
        ax.set_title(f"{result['name']} on {result['device']}"
                     + (f", {subset['train_per_class']} training images per class" if subset else ""))
    fig.tight_layout()
    buffer = io.BytesIO()  # written through fasttl's own temporary: never through a link or into a pipe
    # the title in the file's own metadata marks it as bench's: a later --plot may replace it, no other file
    fig.savefig(buffer, dpi=120, format=os.path.splitext(path)[1][1:].lower(), metadata={"Title": PLOT_TITLE})
    write_atomic(path, buffer.getvalue(), replace=replace)
    plt.close(fig)
