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
        ("num-server-rounds", 0, "[1, 2147483647]"),
        ("batch-size", 2.5, "integer"),
        ("algorithm", "fedsgd", "fml, fedavg, fedprox, local"),
        ("meme-model", "vgg", "cnn"),
        ("local-models", "cnn,foo", "comma list"),
        ("peer-models", "cnn,vgg", "comma list"),
        ("private-peers", 9, "[1, 8]"),
        ("device", "tpu", "cuda:N"),
        ("evaluate-every", 0, "[1, 2147483647]"),
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


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("round-timeout", INF, "(0, 604800]"),  # an unbounded wait
        ("round-timeout", 604800.5, "(0, 604800]"),
        ("lr", INF, "finite number > 0"),
        ("lr", -INF, "finite number > 0"),
        ("lr", NAN, "finite number > 0"),
        ("temperature", INF, "finite number > 0"),
        ("dp-clipping-norm", INF, "finite number > 0"),  # the released meme was all inf
        ("dp-noise-multiplier", INF, "finite number >= 0"),
        ("weight-decay", NAN, "finite number >= 0"),
        ("seed", 2**70, "[0, 9223372036854775807]"),  # failed inside seeding
        ("seed", 2**63, "[0, 9223372036854775807]"),
        ("seed", -1, "[0, 9223372036854775807]"),
        ("num-server-rounds", 10**30, "[1, 2147483647]"),
        ("batch-size", 2**31, "[1, 2147483647]"),
        ("num-classes", 100_001, "[0, 100000]"),
        ("classes-per-client", 100_001, "[1, 100000]"),
    ],
)
def test_infinite_and_out_of_range_numbers_are_refused(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        load_config({key: value})
    msg = str(err.value)
    assert msg.startswith(f"run-config key '{key}' = {value!r} is invalid: expected ")
    assert allowed in msg


def test_a_float_key_given_a_huge_int_is_refused_without_overflow():
    # float(10**400) raises OverflowError; repr of a 5000-digit int raises ValueError
    with pytest.raises(ConfigError, match=r"'lr' = <a 1329-bit integer> is invalid"):
        load_config({"lr": 10**400})
    with pytest.raises(ConfigError, match=r"'seed' = <a 16610-bit integer> is invalid"):
        load_config({"seed": 10**5000})


def test_every_numeric_key_is_finite_and_bounded():
    """The generic rule holds for every key, including ones added later."""
    for k in SCHEMA:
        if k.type is float:
            for bad in (INF, -INF, NAN):
                with pytest.raises(ConfigError, match=f"'{k.name}'"):
                    load_config({k.name: bad})
        if k.type is int:
            for bad in (2**63, -(2**63) - 1, 2**31):  # 2**31: the cap of all but seed
                if k.name == "seed" and bad == 2**31:
                    continue
                with pytest.raises(ConfigError, match=f"'{k.name}'"):
                    load_config({k.name: bad})


def test_boundary_values_just_inside_are_accepted():
    cfg = load_config({"round-timeout": 604800.0, "seed": 2**63 - 1,
                       "num-server-rounds": 2**31 - 1, "num-classes": 100_000,
                       "classes-per-client": 100_000, "lr": 1.7976931348623157e308,
                       "dp-clipping-norm": 1e300, "temperature": 5e-324})
    assert cfg.round_timeout == 604800.0 and cfg.seed == 9223372036854775807
    assert cfg.num_server_rounds == 2147483647 and cfg.num_classes == 100000
    assert cfg.lr == 1.7976931348623157e308 and cfg.temperature == 5e-324


def test_the_seed_bound_is_what_flower_and_the_seeding_accept():
    """``seed``'s cap is the real one: Flower carries run-config ints as sint64, and the
    largest value it carries seeds every generator; one more does not travel."""
    from flwr.common.serde import user_config_value_to_proto

    from common.runtime import derive_seed, seed_everything

    top = load_config({"seed": 2**63 - 1}).seed
    assert user_config_value_to_proto(top).sint64 == 9223372036854775807
    with pytest.raises(ValueError):
        user_config_value_to_proto(top + 1)
    seed_everything(top)
    assert 0 <= derive_seed(top, "meme-init") < 2**63


def test_unknown_key_refused():
    with pytest.raises(ConfigError, match="'lerning-rate'"):
        load_config({"lerning-rate": 0.1})


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="'proximal-mu'"):
        load_config({"algorithm": "fedprox", "proximal-mu": 0.0})


def test_meme_epochs_need_fml():
    with pytest.raises(ConfigError, match="'meme-epochs' = 2.*'fedavg'"):
        load_config({"algorithm": "fedavg", "meme-epochs": 2})
    assert load_config({"meme-epochs": 2}).meme_epochs == 2


def test_private_init_needs_fml_and_names_its_values():
    with pytest.raises(ConfigError, match="'private-init' = 'meme'.*'ditto'"):
        load_config({"algorithm": "ditto", "private-init": "meme"})
    with pytest.raises(ConfigError, match="'private-init'.*random, meme"):
        load_config({"private-init": "zeros"})
    assert load_config({"private-init": "meme"}).private_init.value == "meme"


def test_peer_models_name_one_architecture_per_peer_after_the_first():
    from common.algorithms import get

    with pytest.raises(ConfigError, match=r"'peer-models' = 'mlp'.*'private-peers' = 3"):
        load_config({"private-peers": 3, "peer-models": "mlp"})
    with pytest.raises(ConfigError, match="'private-peers' = 2"):  # peers need fml
        load_config({"algorithm": "fedavg", "private-peers": 2, "peer-models": "mlp"})
    cfg = load_config({"private-peers": 3, "peer-models": "mlp, cnn-bn"})
    slots = get("fml").slots_for(cfg)
    assert [(s.name, s.arch, s.shared) for s in slots] == [
        ("local", "local", False), ("peer-2", "mlp", False), ("peer-3", "cnn-bn", False),
        ("meme", "meme", True)]
    plain = get("fml").slots_for(load_config({"private-peers": 2}))
    assert [s.arch for s in plain] == ["local", "local", "meme"]


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
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # names for annotations only are not imported at run time
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING":
                block.body = []
        for node in ast.walk(tree):
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


def test_max_update_norm_is_refused_where_no_update_can_be_measured():
    """Under SecAgg+ the server never sees one update; `local` and `codistill` train no
    shared meme to measure one from."""
    assert load_config({"max-update-norm": 5.0}).max_update_norm == 5.0
    with pytest.raises(ConfigError, match="'max-update-norm' = 5 with secure-aggregation"):
        load_config({"max-update-norm": 5.0, "secure-aggregation": True, "min-clients": 2})
    for algorithm in ("local", "codistill"):  # codistill's uploads are the clients' own
        with pytest.raises(ConfigError, match=f"'max-update-norm' = 5 .*'{algorithm}' trains "
                                              "no shared meme"):
            load_config({"max-update-norm": 5.0, "algorithm": algorithm})
    with pytest.raises(ConfigError,
                       match="'max-update-norm' = -1.0 is invalid: expected a finite number"):
        load_config({"max-update-norm": -1.0})
