"""Device profiles: every shipped TOML loads, and bad files fail with errors that name key, file and fix."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest
from edge_qmul.devices.profiles import FIELDS, DeviceProfile, list_profiles, load_profile, profile_from_dict

from edge_qmul.errors import ConfigError

SHIPPED = ["imx8mp", "jetson-orin-nano", "rk3588", "rpi4", "rpi5", "x86-server"]
ARM = [n for n in SHIPPED if n != "x86-server"]


def _rpi4_values() -> dict:
    text = (resources.files("edge_qmul.devices") / "profiles" / "rpi4.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def _write(tmp_path: Path, values: dict, name: str = "board.toml") -> Path:
    def fmt(v: object) -> str:
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v).lower() if isinstance(v, bool) else repr(v)

    path = tmp_path / name
    path.write_text("".join(f"{k} = {fmt(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def test_list_profiles_is_the_shipped_set() -> None:
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert 1 <= profile.threads <= profile.cores
    assert profile.memory_budget_mb < profile.ram_mb
    assert profile.latency_budget_ms > 0
    assert "CPUExecutionProvider" in profile.providers
    assert profile.to_dict()["isa"] == list(profile.isa)


@pytest.mark.parametrize("name", ARM)
def test_arm_profiles_use_qnnpack(name: str) -> None:
    profile = load_profile(name)
    assert (profile.arch, profile.quant_engine) == ("aarch64", "qnnpack")
    assert "neon" in profile.isa


def test_x86_profile_uses_x86_engine() -> None:
    profile = load_profile("x86-server")
    assert (profile.arch, profile.quant_engine) == ("x86_64", "x86")


@pytest.mark.parametrize(("name", "dotprod"), [("rpi4", False), ("imx8mp", False), ("rpi5", True), ("rk3588", True)])
def test_dotprod_matches_the_core(name: str, dotprod: bool) -> None:
    assert ("dotprod" in load_profile(name).isa) is dotprod


def test_load_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, _rpi4_values())
    assert load_profile(str(path)) == load_profile("rpi4")
    assert load_profile(path) == load_profile("rpi4")


def test_misspelt_key_names_key_file_and_valid_keys(tmp_path: Path) -> None:
    values = _rpi4_values()
    values["thread"] = values.pop("threads")
    path = _write(tmp_path, values)
    with pytest.raises(ConfigError) as info:
        load_profile(str(path))
    text = str(info.value)
    assert "thread" in info.value.message and str(path) in info.value.message
    assert "'threads'" in info.value.message  # the did-you-mean hint
    assert all(key in info.value.fix for key in FIELDS)
    assert "valid keys" in text


def test_unknown_profile_name_lists_shipped_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_profile("rpi3")
    assert "rpi3" in str(info.value)
    assert all(name in str(info.value) for name in SHIPPED)


def test_missing_file_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threads": 8}, "threads = 8 must be between 1 and cores = 4"),
        ({"threads": 0}, "threads = 0"),
        ({"quant_engine": "x86"}, "does not match arch"),
        ({"arch": "x86_64", "isa": ["avx2"]}, "does not match arch"),
        ({"arch": "riscv64"}, "unknown arch"),
        ({"latency_budget_ms": 0.0}, "latency_budget_ms"),
        ({"memory_budget_mb": -1.0}, "memory_budget_mb"),
        ({"memory_budget_mb": 8192.0}, "exceeds ram_mb"),
        ({"isa": ["neon", "avx2"]}, "unknown aarch64 ISA feature"),
        ({"providers": ["CUDAExecutionProvider"]}, "CPUExecutionProvider"),
    ],
)
def test_invalid_values_rejected(tmp_path: Path, change: dict, match: str) -> None:
    path = _write(tmp_path, {**_rpi4_values(), **change})
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(str(path))
    assert str(path) in info.value.message
    assert info.value.fix


@pytest.mark.parametrize("key", ["threads", "quant_engine", "latency_budget_ms", "isa"])
def test_missing_key_rejected(tmp_path: Path, key: str) -> None:
    values = _rpi4_values()
    del values[key]
    path = _write(tmp_path, values)
    with pytest.raises(ConfigError, match=f"missing key.*{key}") as info:
        load_profile(str(path))
    assert str(path) in info.value.message


@pytest.mark.parametrize(
    ("key", "value"),
    [("cores", "4"), ("cores", 4.0), ("threads", True), ("isa", "neon"), ("isa", ["neon", 1]), ("name", 3)],
)
def test_wrong_type_names_file_and_key(tmp_path: Path, key: str, value: object) -> None:
    path = _write(tmp_path, {**_rpi4_values(), key: value})
    with pytest.raises(ConfigError, match=key) as info:
        load_profile(str(path))
    assert str(path) in info.value.message


def test_int_budget_is_accepted_as_float() -> None:
    profile = profile_from_dict({**_rpi4_values(), "latency_budget_ms": 30}, "test")
    assert profile.latency_budget_ms == 30.0 and isinstance(profile.latency_budget_ms, float)


def test_invalid_toml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(str(path))


def test_profiles_module_does_not_need_torch() -> None:
    import subprocess
    import sys

    code = "import sys, edge_qmul.devices.profiles as p; p.load_profile('rpi4'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
