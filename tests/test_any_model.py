"""docs/any_model.md's example runs as written: T-IMM's maths on a 2D Flax classifier."""

import os
import re

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "any_model.md")


def code_blocks(path: str) -> list[str]:
    with open(path) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_any_model_example_runs(capsys):
    blocks = code_blocks(DOC)
    assert len(blocks) == 1
    namespace: dict = {"__name__": "any_model_example"}
    exec(compile(blocks[0], DOC, "exec"), namespace)  # the page's own asserts must hold
    # not the U-Net: a 2D classifier, split by a path predicate, fused at channel granularity
    assert type(namespace["model"]).__name__ == "SmallCNN"
    assert sorted(namespace["part"].transferable) == ["features_conv1", "features_conv2"]
    assert sorted(namespace["part"].task_specific) == ["head"]
    alpha = namespace["alpha"]
    assert alpha["['features_conv2']"].shape == (8, 2)  # one ratio vector per output channel
    assert "target accuracy" in capsys.readouterr().out
