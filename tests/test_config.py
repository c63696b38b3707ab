"""CompressionConfig and the public entry points that build one: every mode is accepted, every bad
value is rejected with a ValueError that names the bad value and the valid ones."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

import ciuic
from ciuic import CompressionConfig

FIXED_MODES = ("lossless", "2:1", "4:1", "8:1")
GROUP_SIZES = (32, 64, 128, 256)


@pytest.fixture(autouse=True)
def _no_global_compression():
    # A failing test must not leave compression on for the tests that follow (same thread).
    yield
    ciuic.disable_compression()


def _assert_names(message: str, *words: object) -> None:
    missing = [w for w in words if str(w) not in message]
    assert not missing, f"error message {message!r} does not name {missing}"


# ----------------------------------------------------------------------------------------------
# Every mode is accepted
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", FIXED_MODES, ids=lambda m: f"mode={m}")
def test_fixed_mode_accepted(mode):
    config = CompressionConfig(mode=mode)
    assert config.mode == mode
    assert config.budget is None
    # "k:1" promises a ratio of k; lossless promises 1 (nothing lossy).
    expected = 1.0 if mode == "lossless" else float(mode.split(":")[0])
    assert config.target_ratio == expected
    with ciuic.compression(mode) as engine:
        assert ciuic.is_enabled()
        assert ciuic.current_config() is engine.config
        assert engine.config.mode == mode
    assert not ciuic.is_enabled()


def test_modes_constant_lists_every_mode():
    assert set(ciuic.MODES) == set(FIXED_MODES) | {"auto"}


@pytest.mark.parametrize(
    "budget, expected",
    [
        pytest.param("1.5GiB", int(1.5 * 2**30), id="budget=1.5GiB"),
        pytest.param("12GB", 12 * 10**9, id="budget=12GB"),
        pytest.param("512MiB", 512 * 2**20, id="budget=512MiB"),
        pytest.param("1.5 GB", int(1.5 * 10**9), id="budget=1.5 GB"),
        pytest.param("64 kib", 64 * 2**10, id="budget=64 kib"),
        pytest.param(123_456_789, 123_456_789, id="budget=int"),
    ],
)
def test_auto_budget_parses(budget, expected):
    config = CompressionConfig(mode="auto", budget=budget)
    assert config.mode == "auto"
    assert config.budget == expected
    assert isinstance(config.budget, int)
    assert config.target_ratio is None  # auto aims at bytes, not a ratio
    with ciuic.compression(mode="auto", budget=budget) as engine:
        assert engine.config.budget == expected


def test_auto_budget_1_5gib_through_every_entry_point():
    expected = 3 * 2**29
    assert ciuic.compression(mode="auto", budget="1.5GiB").config.budget == expected
    assert CompressionConfig.from_value({"mode": "auto", "budget": "1.5GiB"}).budget == expected
    assert CompressionConfig.from_value("auto", budget="1.5GiB").budget == expected
    config = ciuic.enable_compression("auto", budget="1.5GiB")
    assert config.budget == expected
    assert ciuic.current_config().budget == expected


# ----------------------------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["3:1", "fast", "4:1 ", "", "LOSSLESS"], ids=lambda m: f"mode={m!r}")
def test_bad_mode_names_value_and_choices(mode):
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode=mode)
    _assert_names(str(info.value), repr(mode), *ciuic.MODES)
    # The same error from the user-facing entry points.
    with pytest.raises(ValueError) as info:
        ciuic.compression(mode)
    _assert_names(str(info.value), repr(mode), *ciuic.MODES)
    with pytest.raises(ValueError) as info:
        ciuic.enable_compression(mode)
    _assert_names(str(info.value), repr(mode))
    assert not ciuic.is_enabled()


@pytest.mark.parametrize(
    "budget", ["12 parsecs", "abc", "GB", "-1GB", "0GB", 0, -5, True, "1.5.2GB"],
    ids=lambda b: f"budget={b!r}",
)
def test_bad_budget_names_value(budget):
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode="auto", budget=budget)
    message = str(info.value)
    _assert_names(message, repr(budget))
    # ...and says what a valid budget looks like (a unit example or the > 0 rule).
    assert re.search(r"GB|> ?0", message), message


def test_auto_without_budget_rejected():
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode="auto")
    _assert_names(str(info.value), "budget", "auto")


@pytest.mark.parametrize("mode", FIXED_MODES, ids=lambda m: f"mode={m}")
def test_budget_without_auto_rejected(mode):
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode=mode, budget="12GB")
    _assert_names(str(info.value), "'12GB'", "auto", repr(mode))
    with pytest.raises(ValueError):
        ciuic.compression(mode, budget="1GB")


@pytest.mark.parametrize("group_size", [16, 48, 100, 512, 0, -64], ids=lambda g: f"group_size={g}")
def test_bad_group_size_names_value_and_choices(group_size):
    with pytest.raises(ValueError) as info:
        CompressionConfig(group_size=group_size)
    _assert_names(str(info.value), f"group_size={group_size}", *GROUP_SIZES)


@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"group_size={g}")
def test_every_group_size_accepted(group_size):
    assert CompressionConfig(group_size=group_size).group_size == group_size


@pytest.mark.parametrize("rounding", ["floor", "Nearest", "random", ""], ids=lambda r: f"rounding={r!r}")
def test_bad_rounding_names_value_and_choices(rounding):
    with pytest.raises(ValueError) as info:
        CompressionConfig(rounding=rounding)
    _assert_names(str(info.value), repr(rounding), "nearest", "stochastic")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"], ids=lambda r: f"rounding={r}")
def test_every_rounding_accepted(rounding):
    assert CompressionConfig(rounding=rounding).rounding == rounding


@pytest.mark.parametrize(
    "option, value",
    [pytest.param(o, v, id=f"{o}={v!r}") for o, v in [
        ("min_numel", -1), ("recalibrate_every", -3), ("seed", -1), ("seed", 1.5),
        ("min_numel", "4096"), ("lean_lm_head", "yes"), ("lean_lm_head", 1)]],
)
def test_bad_option_value_names_option_and_value(option, value):
    with pytest.raises(ValueError) as info:
        CompressionConfig(**{option: value})
    _assert_names(str(info.value), f"{option}={value!r}")


@pytest.mark.parametrize("spelling", ["groupsize", "bits", "budgett"], ids=lambda s: f"option={s}")
def test_unknown_option_named(spelling):
    valid = CompressionConfig.options()
    for call in (
        lambda: CompressionConfig.from_value("4:1", **{spelling: 1}),
        lambda: CompressionConfig.from_value({"mode": "4:1", spelling: 1}),
        lambda: ciuic.compression("4:1", **{spelling: 1}),
        lambda: ciuic.enable_compression("4:1", **{spelling: 1}),
    ):
        with pytest.raises(ValueError) as info:
            call()
        _assert_names(str(info.value), repr(spelling), *valid)
    assert not ciuic.is_enabled()


def test_options_are_the_dataclass_fields():
    assert CompressionConfig.options() == tuple(f.name for f in dataclasses.fields(CompressionConfig))
    assert {"mode", "budget", "group_size", "rounding", "min_numel"} <= set(CompressionConfig.options())


# ----------------------------------------------------------------------------------------------
# from_value and the entry points
# ----------------------------------------------------------------------------------------------
def test_from_value_string():
    config = CompressionConfig.from_value("8:1")
    assert config == CompressionConfig(mode="8:1")


def test_from_value_dict():
    options = {"mode": "2:1", "group_size": 128, "rounding": "stochastic", "keep_modules": ["lm_head"]}
    config = CompressionConfig.from_value(options)
    assert config == CompressionConfig(mode="2:1", group_size=128, rounding="stochastic",
                                       keep_modules=("lm_head",))
    assert options == {"mode": "2:1", "group_size": 128, "rounding": "stochastic",
                       "keep_modules": ["lm_head"]}, "the caller's dict must not be modified"


def test_from_value_config_is_returned_or_replaced():
    config = CompressionConfig(mode="8:1", group_size=32)
    assert CompressionConfig.from_value(config) is config
    replaced = CompressionConfig.from_value(config, rounding="stochastic")
    assert replaced == CompressionConfig(mode="8:1", group_size=32, rounding="stochastic")
    assert config.rounding == "nearest"  # the original is untouched (frozen)
    with pytest.raises(ValueError) as info:
        CompressionConfig.from_value(config, group_size=3)
    _assert_names(str(info.value), "group_size=3")


def test_from_value_keyword_options():
    assert CompressionConfig.from_value(mode="lossless", min_numel=0) == CompressionConfig(
        mode="lossless", min_numel=0)
    assert CompressionConfig.from_value() == CompressionConfig()
    # keywords override the mode string / dict
    assert CompressionConfig.from_value("4:1", mode="8:1").mode == "8:1"
    assert CompressionConfig.from_value({"mode": "2:1"}, group_size=256).group_size == 256


@pytest.mark.parametrize("value", [4, 4.0, ("4:1",), object()], ids=lambda v: f"value={type(v).__name__}")
def test_from_value_bad_type(value):
    with pytest.raises(ValueError) as info:
        CompressionConfig.from_value(value)
    _assert_names(str(info.value), "4:1", "lossless", "CompressionConfig")


def test_compression_accepts_every_form():
    assert ciuic.compression().config.mode == "4:1"  # the default
    assert ciuic.compression("2:1").config.mode == "2:1"
    assert ciuic.compression({"mode": "8:1", "group_size": 32}).config.group_size == 32
    config = CompressionConfig(mode="lossless")
    assert ciuic.compression(config).config is config
    assert ciuic.compression(config=config).config is config
    assert ciuic.compression(mode="8:1", rounding="stochastic").config.rounding == "stochastic"
    with pytest.raises(ValueError, match="either"):
        ciuic.compression("4:1", config=config)


def test_config_is_frozen_and_normalised():
    config = CompressionConfig(keep_modules="lm_head")
    assert config.keep_modules == ("lm_head",)
    assert CompressionConfig(keep_modules=["a", "b"]).keep_modules == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "8:1"
    hash(CompressionConfig())  # usable as a key


def test_enable_with_bad_option_keeps_previous_setting():
    ciuic.enable_compression("8:1")
    with pytest.raises(ValueError):
        ciuic.enable_compression("9:1")
    assert ciuic.is_enabled()
    assert ciuic.current_config().mode == "8:1"
    ciuic.disable_compression()
    assert not ciuic.is_enabled()


def test_parse_bytes_public():
    assert ciuic.parse_bytes("1.5GiB") == 3 * 2**29
    assert ciuic.parse_bytes(2048) == 2048
    with pytest.raises(ValueError) as info:
        ciuic.parse_bytes("lots")
    _assert_names(str(info.value), "'lots'", "GB")


# ----------------------------------------------------------------------------------------------
# Budgets as a fraction of the uncompressed pass
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget, expected",
    [
        pytest.param("25%", 0.25, id="budget=25%"),
        pytest.param("100%", 1.0, id="budget=100%"),
        pytest.param(" 12.5 % ", 0.125, id="budget=12.5%"),
        pytest.param("0.5%", 0.005, id="budget=0.5%"),
        pytest.param(0.25, 0.25, id="budget=0.25"),
        pytest.param(1.0, 1.0, id="budget=1.0"),
    ],
)
def test_fractional_budget_parses_to_a_float(budget, expected):
    config = CompressionConfig(mode="auto", budget=budget)
    assert isinstance(config.budget, float)
    assert config.budget == pytest.approx(expected)
    assert config.budget_fraction == pytest.approx(expected)
    assert ciuic.compression(mode="auto", budget=budget).config.budget == pytest.approx(expected)
    assert CompressionConfig.from_value({"mode": "auto", "budget": budget}).budget == pytest.approx(expected)


@pytest.mark.parametrize("budget, expected", [
    pytest.param(12e9, 12 * 10**9, id="budget=12e9"), pytest.param(1, 1, id="budget=int 1"),
    pytest.param("6GB", 6 * 10**9, id="budget=6GB")])
def test_byte_budgets_stay_ints(budget, expected):
    config = CompressionConfig(mode="auto", budget=budget)
    assert config.budget == expected and isinstance(config.budget, int)
    assert config.budget_fraction is None


@pytest.mark.parametrize("budget", ["0%", "150%", "100.5%", "-5%", "%", "abc%", 0.0, -0.25, float("nan"),
                                    float("inf"), "25%%"], ids=lambda b: f"budget={b!r}")
def test_bad_fractional_budget_names_value_and_forms(budget):
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode="auto", budget=budget)
    message = str(info.value)
    _assert_names(message, repr(budget), "'25%'", "'12GB'")


def test_fractional_budget_survives_the_launcher_environment():
    # what ciuic-accelerate / python -m ciuic report pass to the processes they start
    from ciuic_integrations._common import resolve_config, setting_for_env

    config = CompressionConfig(mode="auto", budget="25%")
    assert resolve_config(setting_for_env(config)) == config


def test_fraction_budget_only_with_auto():
    with pytest.raises(ValueError) as info:
        CompressionConfig(mode="4:1", budget="25%")
    _assert_names(str(info.value), "'25%'", "auto")


# ----------------------------------------------------------------------------------------------
# allocator=True/False and ciuic.memory.configure_allocator (CUDA faked: the logic runs on CPU)
# ----------------------------------------------------------------------------------------------
ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA available and not yet initialised; no allocator variables set; warn-once state fresh."""
    import torch

    from ciuic import memory

    state = {"initialized": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["initialized"])
    for name in ALLOC_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory, "_allocator_warned", False)
    monkeypatch.setattr(memory, "_allocator_state", {"status": "not configured"})
    return state


def test_allocator_option_validated():
    assert CompressionConfig().allocator is True
    assert CompressionConfig(allocator=False).allocator is False
    for value in ("yes", 1, None):
        with pytest.raises(ValueError) as info:
            CompressionConfig(allocator=value)
        _assert_names(str(info.value), f"allocator={value!r}", "True", "False")


def test_allocator_set_before_cuda_initialises(fake_cuda):
    from ciuic.memory import allocator_status, configure_allocator

    assert configure_allocator(CompressionConfig()) == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_ALLOC_CONF" not in os.environ
    assert allocator_status()["status"] == "set"
    # idempotent: a second enable changes nothing and keeps the status
    assert configure_allocator(CompressionConfig()) is None
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert allocator_status()["status"] == "set"


@pytest.mark.parametrize("variable", ALLOC_VARS)
def test_allocator_merges_with_the_users_setting(fake_cuda, monkeypatch, variable):
    from ciuic.memory import configure_allocator

    user = "max_split_size_mb:128,roundup_power2_divisions:[256:1,512:2,>:4]"
    monkeypatch.setenv(variable, user)
    configure_allocator(CompressionConfig())
    assert os.environ[variable] == user + ",expandable_segments:True"
    other = [v for v in ALLOC_VARS if v != variable][0]
    assert other not in os.environ  # the variable the user chose is the one changed


@pytest.mark.parametrize("user", ["expandable_segments:False", "garbage_collection_threshold:0.6, expandable_segments:False",
                                  "backend:cudaMallocAsync"])
def test_allocator_never_overrides_the_user(fake_cuda, monkeypatch, user):
    from ciuic.memory import allocator_status, configure_allocator

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user)
    assert configure_allocator(CompressionConfig()) is None
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == user
    assert allocator_status()["status"] == "kept user setting"


def test_allocator_warns_once_when_cuda_is_initialised(fake_cuda):
    import warnings

    from ciuic.memory import allocator_status, configure_allocator

    fake_cuda["initialized"] = True
    with pytest.warns(UserWarning) as caught:
        assert configure_allocator(CompressionConfig()) is None
    message = str(caught[0].message)
    _assert_names(message, "PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", "allocator=False")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert allocator_status()["status"] == "too late"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure_allocator(CompressionConfig())  # once per process


def test_allocator_opt_out_and_no_cuda(fake_cuda, monkeypatch):
    import torch

    from ciuic.memory import allocator_status, configure_allocator

    assert configure_allocator(CompressionConfig(allocator=False)) is None
    assert allocator_status()["status"] == "disabled"
    fake_cuda["initialized"] = True
    assert configure_allocator(CompressionConfig(allocator=False)) is None  # no warning either
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert configure_allocator(CompressionConfig()) is None
    assert allocator_status()["status"] == "no CUDA"
    assert not any(name in os.environ for name in ALLOC_VARS)


def test_enabling_compression_sets_the_allocator_up(fake_cuda):
    ciuic.compression("4:1")
    assert os.environ.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True"


def test_enabling_compression_with_allocator_false_leaves_it(fake_cuda):
    ciuic.enable_compression("4:1", allocator=False)
    ciuic.disable_compression()
    assert not any(name in os.environ for name in ALLOC_VARS)
