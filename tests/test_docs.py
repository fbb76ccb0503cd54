"""The documentation's examples run as written."""
import re
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/samplers.md", "docs/distillers.md", "docs/partial-runs.md", "README.md", "docs/testing.md"]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS)
def test_doc_examples_run(path):
    blocks = python_blocks(path)
    assert blocks, f"{path} has no python example"
    namespace = {"__name__": "__doc_example__"}  # a page's blocks run in order, as a reader runs them
    for block in blocks:
        exec(compile(block, path, "exec"), namespace)
