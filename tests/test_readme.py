"""The README's code runs: every ```python block as a script (in a temporary folder holding a small
`my_data` of real CIFAR-10 images), and every `fasttl ...` command line of the ```bash blocks
parses with the options the CLI really has."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def blocks(language: str):
    with open(README) as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_readme_has_code_to_check():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 4


@pytest.fixture
def my_data(tmp_path, cifar10_root):
    """my_data/{train,test}/<class>/ with 6 and 3 real CIFAR-10 images of two classes; the first
    test cat is a 203 x 131 photo (the deployment snippet's resize is checked beyond 32 px)."""
    from PIL import Image

    for split, count in (("train", 6), ("test", 3)):
        for name in ("cat", "ship"):
            folder = tmp_path / "my_data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shutil.copy(os.path.join(cifar10_root, split, name, f"{i:04d}.jpg"), folder / f"{i}.jpg")
    photo = tmp_path / "my_data" / "test" / "cat" / "0.jpg"
    Image.open(photo).convert("RGB").resize((203, 131), Image.LANCZOS).save(photo, quality=92)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, my_data):
    code = blocks("python")[index]
    script = my_data / f"readme_block_{index}.py"
    script.write_text(code.replace("    ...\n", "    pass\n"))
    env = dict(os.environ, FASTTL_CACHE_DIR=str(my_data / "feature-cache"))
    result = subprocess.run([sys.executable, str(script)], cwd=my_data, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, f"README python block {index} failed:\n{code}\n{result.stderr[-3000:]}"


def fasttl_commands():
    """Each `fasttl ...` line of the bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and "fasttl" in words:  # torchrun ... -m fasttl extract ...
                words = ["fasttl"] + words[words.index("fasttl") + 1:]
            if words[:1] == ["fasttl"]:
                commands.append(words[1:])
    return commands


@pytest.mark.parametrize("words", fasttl_commands(), ids=" ".join)
def test_bash_block_commands_parse(words):
    from fasttl.cli import build_parser

    args = build_parser().parse_args(words)  # an unknown option or choice exits 2 here
    assert args.func is not None
