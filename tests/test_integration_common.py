"""What the integrations share: `import ciuic` imports no framework, a missing framework names its
extra, settings parse from flags and the environment, and the bootstrap runs a script compressed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import ciuic
from ciuic_integrations._common import parse_setting, resolve_config, setting_for_env

FRAMEWORKS = ["lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers"]


def python(code: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180, env=full_env, cwd=cwd)


def test_import_ciuic_imports_no_framework_and_missing_ones_name_their_extra():
    result = python(
        f"""
        import sys
        import ciuic, ciuic_integrations
        print([m for m in {FRAMEWORKS!r} if m in sys.modules])
        # Now pretend the frameworks are not installed (None in sys.modules makes import fail).
        for name in {FRAMEWORKS!r}:
            sys.modules[name] = None
        from ciuic_integrations.lightning import strategy_classes
        for statement in ("strategy_classes()", "import ciuic_integrations.accelerate",
                          "import ciuic_integrations.transformers"):
            try:
                exec(statement)
            except ImportError as error:
                print(error)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "[]"
    for line, extra in zip(lines[1:], ["lightning", "accelerate", "transformers"]):
        assert f"pip install 'ciuic[{extra}]'" in line


@pytest.mark.parametrize("module", ["ciuic_integrations", "ciuic_integrations.lightning",
                                    "ciuic_integrations.accelerate", "ciuic_integrations.transformers",
                                    "ciuic_integrations._hf_lm_head"])
def test_an_integration_imported_before_ciuic_leaves_ciuic_imported_and_registered(module):
    # `from ciuic_integrations.transformers import CiuicTrainingArguments` as a script's first line
    # once failed with a circular import (ciuic's __init__ registers a preparer from _hf_lm_head).
    result = python(
        f"""
        import json, sys
        import {module}
        import ciuic
        from ciuic_integrations._hf_lm_head import prepare_model
        import lightning
        from lightning.pytorch.strategies import StrategyRegistry
        print(json.dumps([prepare_model in ciuic._model_preparers, "ciuic_4:1" in StrategyRegistry,
                          callable(ciuic.compression)]))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [True, True, True]


@pytest.mark.parametrize("value, expected", [
    (None, None), ("off", None), ("  none ", None), ("", None), (False, None),
    ("4:1", "4:1"), (" 8:1 ", "8:1"),
    ('{"mode": "auto", "budget": "12GB"}', {"mode": "auto", "budget": "12GB"}),
    ({"mode": "2:1"}, {"mode": "2:1"}),
])
def test_parse_setting(value, expected):
    assert parse_setting(value) == expected


def test_resolve_config_combines_mode_and_options_and_rejects_bad_values():
    assert resolve_config(None) is None and resolve_config("off", None) is None
    assert resolve_config("8:1", {"group_size": 128}) == ciuic.CompressionConfig(mode="8:1", group_size=128)
    assert resolve_config(None, '{"mode": "auto", "budget": 1000}').budget == 1000
    assert resolve_config(None, {"group_size": 32}).mode == "4:1"  # options alone turn it on
    config = ciuic.CompressionConfig(mode="2:1")
    assert resolve_config(config) is config
    with pytest.raises(ValueError, match="4:1"):
        resolve_config("6:1")
    with pytest.raises(ValueError, match="given twice"):
        resolve_config("8:1", {"mode": "2:1"})
    with pytest.raises(ValueError, match="JSON"):
        resolve_config('{"mode": ')


@pytest.mark.parametrize("config", [
    ciuic.CompressionConfig(),
    ciuic.CompressionConfig(mode="8:1", group_size=128, keep_modules=("lm_head",)),
    ciuic.CompressionConfig(mode="auto", budget="12GB", rounding="stochastic"),
], ids=["default", "options", "auto"])
def test_environment_value_round_trips(config):
    value = setting_for_env(config)
    assert resolve_config(value) == config
    if config == ciuic.CompressionConfig():
        assert value == "4:1"


@pytest.mark.parametrize("as_module", [False, True], ids=["script", "module"])
def test_bootstrap_runs_a_script_compressed_and_writes_its_accounting(tmp_path, as_module):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(textwrap.dedent(
        """
        import json, sys
        import torch
        import ciuic
        layer = torch.nn.Linear(64, 64)
        loss = layer(torch.randn(128, 64)).relu().sum()
        loss.backward()
        print(json.dumps({"name": __name__, "argv": sys.argv[1:], "enabled": ciuic.is_enabled()}))
        """
    ))
    target = ["-m", "pkg.train"] if as_module else [str(package / "train.py")]
    result = subprocess.run(
        [sys.executable, "-m", "ciuic_integrations._bootstrap", *target, "--flag", "1"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", CIUIC_MODE='{"mode": "8:1", "min_numel": 0}',
                 CIUIC_STATS_DIR=str(tmp_path / "stats")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen == {"name": "__main__", "argv": ["--flag", "1"], "enabled": True}
    record = json.loads((tmp_path / "stats" / "ciuic_stats_rank0.json").read_text())
    assert record["config"]["mode"] == "8:1" and record["stats"]["tensors_packed"] > 0
    assert "ciuic: saved activations at peak" in result.stderr
