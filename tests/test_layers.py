"""The package's layers: the core (backbones, data, losses) never imports the world, anchors, eval or the demo."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "anchor_clip"
CORE = sorted([*(PACKAGE / "backbones").glob("*.py"), *(PACKAGE / "data").glob("*.py"), PACKAGE / "losses.py",
               PACKAGE / "specs.py"])
UPPER = ("anchor_clip.world", "anchor_clip.anchors", "anchor_clip.eval", "anchor_clip.demo")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", CORE, ids=[str(p.relative_to(PACKAGE)) for p in CORE])
def test_core_modules_import_no_upper_layer(path):
    upward = sorted(n for n in _imports(path) if n.startswith(UPPER))
    assert not upward, f"{path.relative_to(PACKAGE)} imports {upward}"


def test_world_clip_is_registered_by_importing_the_package():
    import anchor_clip

    assert "world_clip" in anchor_clip.list_backbones()
