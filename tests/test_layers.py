"""fasttl's layers import one way only: kernel API <- util <- backbones <- data <- features (the
cache) <- heads <- transfer <- app. Every import statement counts, function-level ones included,
and so does a module named to importlib by a literal string."""
import ast
import os

import pytest

import fasttl

PACKAGE = os.path.dirname(fasttl.__file__)

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = (
    ("kernel", ("fasttl._native", "fasttl._C", "fasttl._ops", "fasttl._op_checks", "fasttl._device_checks",
                "fasttl._reference", "fasttl._version",
                "fasttl.optim", "fasttl.nn", "fasttl.losses", "fasttl.onnx_graph")),
    ("util", ("fasttl.util",)),
    ("backbones", ("fasttl.backbones",)),
    ("data", ("fasttl.data",)),
    ("features", ("fasttl.cache",)),
    ("heads", ("fasttl.heads",)),
    ("transfer", ("fasttl.transfer",)),
    ("app", ("fasttl.cli", "fasttl.cli_errors", "fasttl.__main__", "fasttl.predict", "fasttl.export", "fasttl.extract",
             "fasttl.info",
             "fasttl.bench")),
    ("api", ("fasttl",)),  # the package's front: it may name anything, nothing may import it
)


def module_files() -> dict:
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def layer(module: str):
    best = max(((len(prefix), rank, name) for rank, (name, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[1], best[2]


def imported(module: str, path: str):
    """(line, module) of each fasttl module `module` imports, anywhere in the file."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from fasttl.x import y`: y is a module of its own, or a name in x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES or f"{base}.{a.name}" == "fasttl._C"
                     else base for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            names = [node.args[0].value]
        for name in names:
            if isinstance(name, str) and (name == "fasttl" or name.startswith("fasttl.")):
                while name not in MODULES and name != "fasttl._C":
                    name = name.rsplit(".", 1)[0]
                yield node.lineno, name


def test_every_import_goes_down_the_layers():
    upward = []
    for module, path in sorted(MODULES.items()):
        rank, name = layer(module)
        for line, target in imported(module, path):
            if target != module and layer(target)[0] > rank:
                upward.append(f"{os.path.relpath(path, PACKAGE)}:{line}: {module} ({name}) imports {target} "
                              f"({layer(target)[1]})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def import_graph() -> dict:
    """module -> the fasttl modules it imports (a module importing its own package's __init__ aside:
    Python runs that first anyway)."""
    return {module: {t for _, t in imported(module, path) if t != module and not module.startswith(t + ".")}
            for module, path in MODULES.items()}


def find_cycles(graph: dict) -> list:
    cycles, done = [], set()

    def visit(node, trail):
        if node in trail:
            cycles.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, trail + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_module_imports_itself_back():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


@pytest.mark.parametrize("snippet, expected", [
    ("from fasttl.transfer import job", "fasttl.transfer.job"),
    ("def f():\n    from fasttl.cache.build import write_cache", "fasttl.cache.build"),
    ("import importlib\nimportlib.import_module('fasttl.cli')", "fasttl.cli"),
    ("from fasttl.heads import train_head", "fasttl.heads"),
])
def test_the_walk_sees_every_kind_of_import(tmp_path, snippet, expected):
    path = tmp_path / "probe.py"
    path.write_text(snippet)
    assert [name for _, name in imported("fasttl.util.probe", str(path))] == [expected]


def test_every_fasttl_variable_is_read_through_settings_and_listed_in_the_readme():
    from fasttl.util import settings

    readme = open(os.path.join(os.path.dirname(PACKAGE), "README.md"), encoding="utf-8").read()
    for setting in settings.SETTINGS:
        default = f"`{setting.default}`" if setting.default else "-"
        assert f"| `{setting.name}` | {default} | {setting.help} |" in readme, setting.name
    # os.environ / os.getenv with a literal FASTTL_ name anywhere else would be a second place
    readers = []
    for module, path in MODULES.items():
        if module == "fasttl.util.settings":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("FASTTL_") \
                    and node.value.isidentifier():
                readers.append(f"{module}:{node.lineno} {node.value}")
    assert not readers, "FASTTL_ variables named outside fasttl/util/settings.py:\n" + "\n".join(readers)


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # of code: a public function's docstring is its reference, not its length


def function_lengths(path: str):
    """(name, line, lines of code) of every function in the file, its docstring left out."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            yield node.name, node.lineno, lines


def test_modules_and_functions_stay_small():
    """A newcomer reads a module in one sitting and a function on one screen."""
    too_long = [f"{os.path.relpath(path, PACKAGE)}: {count} lines" for path in MODULES.values()
                if (count := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_MODULE_LINES]
    too_long += [f"{os.path.relpath(path, PACKAGE)}:{line} {name}: {lines} lines" for path in MODULES.values()
                 for name, line, lines in function_lengths(path) if lines > MAX_FUNCTION_LINES]
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {too_long}"


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    path = tmp_path / "m.py"
    path.write_text(f'def long():\n    """A docstring\n    of lines."""\n{body}\n\n\ndef short():\n    return 1\n')
    assert [(name, lines) for name, _, lines in function_lengths(str(path))] == [("long", MAX_FUNCTION_LINES + 2),
                                                                                  ("short", 2)]


def test_no_strategy_imports_another():
    """A strategy is read on its own: what two strategies share (the small CNN, the feature
    caches and their model, the common timings) lives beside them in fasttl.transfer."""
    package = "fasttl.transfer.strategies"
    crossing = [f"{module} imports {name} (line {line})" for module, path in MODULES.items()
                if module.startswith(package + ".") for line, name in imported(module, path)
                if name.startswith(package + ".") and name != module]
    assert not crossing, crossing
    assert len([m for m in MODULES if m.startswith(package + ".")]) >= 5  # the walk saw the strategies
