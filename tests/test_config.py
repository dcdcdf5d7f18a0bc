"""The run-config schema: defaults in sync with pyproject, clear errors naming the key."""

import tomllib
from pathlib import Path

import pytest

from common.config import SCHEMA, Algorithm, ConfigError, load_config
from common.faults import Fault

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_lists_every_key_with_the_schema_default():
    app_cfg = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_cfg) == {k.name for k in SCHEMA}
    cfg = load_config(app_cfg).to_dict()
    defaults = load_config({}).to_dict()
    assert cfg == defaults


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("alpha", 1.5, "[0, 1]"),
        ("dataset", "imagenet", "fashion-mnist"),
        ("beta", -0.1, "[0, 1]"),
        ("temperature", 0, "> 0"),
        ("fraction-train", 0.0, "(0, 1]"),
        ("num-server-rounds", 0, ">= 1"),
        ("batch-size", 2.5, "integer"),
        ("algorithm", "fedsgd", "fml, fedavg, fedprox, local"),
        ("meme-model", "vgg", "cnn"),
        ("local-models", "cnn,foo", "comma list"),
        ("device", "tpu", "cuda:N"),
        ("evaluate-every", 0, ">= 1"),
        ("precision", "fp16", "fp32, bf16"),
        ("torch-compile", "yes", "bool"),
        ("lr", True, "> 0"),
        ("faults", "slow:1", "slow<SECONDS>"),
        ("faults", "scale:1", "scale<FACTOR>"),
        ("faults", "slowabc:1@2", "slow<SECONDS>"),
        ("faults", "slow-3:1", "slow<SECONDS>"),
        ("faults", "scale2:x", "KIND:PARTITION[@ROUND]"),
    ],
)
def test_bad_value_names_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config({key: value})
    msg = str(err.value)
    assert f"'{key}'" in msg and repr(value) in msg and allowed in msg


def test_unknown_key_refused():
    with pytest.raises(ConfigError, match="'lerning-rate'"):
        load_config({"lerning-rate": 0.1})


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="'proximal-mu'"):
        load_config({"algorithm": "fedprox", "proximal-mu": 0.0})


def test_types_and_local_model_cycle():
    cfg = load_config({"algorithm": "local", "lr": 1, "local-models": "cnn, mlp"})
    assert cfg.algorithm is Algorithm.LOCAL and isinstance(cfg.lr, float)
    assert [cfg.local_model_for(p) for p in range(3)] == ["cnn", "mlp", "cnn"]
    assert cfg.local_model_for(None) == "cnn"


def test_fault_list_parses_every_kind():
    cfg = load_config({"faults": "raise:1@2, nan:2, scale100:3, slow7.5:0@4"})
    assert cfg.fault_list == (Fault("raise", 1, 2), Fault("nan", 2),
                              Fault("scale", 3, factor=100.0), Fault("slow", 0, 4, seconds=7.5))
    assert cfg.fault_list[3].applies(0, 4) and not cfg.fault_list[3].applies(0, 3)


def test_generated_reference_and_pyproject_block_are_fresh():
    from common import config_doc

    assert config_doc.stale() == [], "run `python -m common.config_doc` and commit the result"


def test_a_stale_reference_page_is_reported(tmp_path, monkeypatch):
    from common import config_doc

    page = tmp_path / "configuration.md"
    page.write_text(config_doc.DOC.read_text().replace("`0.01`", "`0.02`"))
    monkeypatch.setattr(config_doc, "DOC", page)
    assert config_doc.stale() == [page]
    assert config_doc.main(["--check"]) == 1


def test_reference_page_lists_every_key_once_with_its_default():
    text = (PYPROJECT.parent / "docs" / "configuration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(k.name for k in SCHEMA)
    row = next(r for r in rows if r.startswith("| `aggregation`"))
    assert "`multi-krum`" in row and '`"weighted"`' in row


def test_importing_the_config_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, common.config, common.config_doc; "
            "sys.exit(2 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=PYPROJECT.parent).returncode == 0


def test_common_imports_one_way_and_without_cycles():
    import ast

    common = PYPROJECT.parent / "common"
    graph: dict[str, set[str]] = {}
    for path in common.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in ("client", "server", "simulations", "tests"), (path, name)
                if top == "common" and "." in name:
                    deps.add(name.split(".")[1])
        graph[path.stem] = deps
    done: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        assert mod not in stack, f"import cycle: {' -> '.join(stack + (mod,))}"
        if mod in done:
            return
        for dep in graph.get(mod, ()):
            visit(dep, stack + (mod,))
        done.add(mod)

    for mod in graph:
        visit(mod, ())
