"""pipeline/config.py: dataclasses + YAML + `--set a.b=value`, on the real PipelineConfig tree."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import (
    ConfigError,
    config_hash,
    config_json,
    dump_yaml,
    from_dict,
    load_config,
    to_dict,
)
from pipeline.settings import PipelineConfig

TOP_KEYS = ["input", "output", "probe", "decode", "scenes", "buckets", "caption", "vae", "compute"]
BUCKET_KEYS = ["resolutions_px", "aspect_ratios", "num_frames", "fps", "size_multiple_px"]


# ---------------------------------------------------------------------------
# Small ad-hoc config tree
# ---------------------------------------------------------------------------


@dataclass
class Inner:
    """A nested section with a validate hook."""

    size_px: int = 8
    mode: Literal["fast", "exact"] = "fast"
    ratio: float = 0.5
    tags: list[str] = field(default_factory=lambda: ["a"])
    limit: int | None = None

    def validate(self) -> None:
        if self.size_px % 2:
            raise ValueError(f"inner.size_px must be even, got {self.size_px}")


@dataclass
class Outer:
    """Top level of the ad-hoc tree."""

    name: str = "demo"
    enabled: bool = True
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)


def _names_all(message: str, keys: list[str]) -> bool:
    return all(repr(k) in message for k in keys)


# ---------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(PipelineConfig, {"buckets": {"fps": 4}, "bukets": {"fps": 4}})
    msg = str(e.value)
    assert "'bukets'" in msg
    assert _names_all(msg, TOP_KEYS), msg


def test_unknown_nested_key_names_full_path_and_section_keys() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(PipelineConfig, {"buckets": {"fpss": 4}})
    msg = str(e.value)
    assert "'buckets.fpss'" in msg
    assert _names_all(msg, BUCKET_KEYS), msg
    # The list given is the section's keys, not the top level's.
    assert "'compute'" not in msg


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("scenes:\n  detector: content\n  treshold: 3\n")
    with pytest.raises(ConfigError, match=r"scenes\.treshold") as e:
        load_config(PipelineConfig, path)
    assert "'min_scene_len_frames'" in str(e.value)


@pytest.mark.parametrize(
    ("override", "bad", "valid"),
    [
        ("bukets.fps=4", "bukets.fps", TOP_KEYS),
        ("buckets.fpz=4", "buckets.fpz", BUCKET_KEYS),
        ("caption.clip.archh=tiny", "caption.clip.archh", ["arch", "weights", "seed", "dtype"]),
    ],
)
def test_unknown_key_in_override_names_it_and_lists_valid_keys(override: str, bad: str, valid: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, overrides=[override])
    msg = str(e.value)
    assert repr(bad) in msg
    assert _names_all(msg, valid), msg


def test_override_into_a_value_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match=r"buckets\.fps is not a section"):
        load_config(PipelineConfig, overrides=["buckets.fps.x=1"])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(PipelineConfig, overrides=["buckets.fps"])


# ---------------------------------------------------------------------------
# Values via yaml.safe_load, types, Literal
# ---------------------------------------------------------------------------


def test_override_values_are_parsed_with_yaml() -> None:
    cfg = load_config(
        PipelineConfig,
        overrides=[
            "buckets.fps=24",
            "buckets.num_frames=[1,17]",
            "input.sniff_content=false",
            "input.use_sidecars=no",  # YAML 1.1 boolean, as yaml.safe_load reads it
            "output.uri=s3://bucket/x?a=b",  # only the first '=' splits
            "compute.caption_actors=3",
            "buckets.aspect_ratios=['16:9', '1:1']",
        ],
    )
    assert cfg.buckets.fps == 24.0 and type(cfg.buckets.fps) is float
    assert cfg.buckets.num_frames == [1, 17]
    assert cfg.input.sniff_content is False and cfg.input.use_sidecars is False
    assert cfg.output.uri == "s3://bucket/x?a=b"
    assert cfg.compute.caption_actors == 3
    assert cfg.buckets.aspect_ratios == ["16:9", "1:1"]
    # Untouched fields keep their defaults.
    assert cfg.buckets.resolutions_px == PipelineConfig().buckets.resolutions_px


def test_exponent_without_dot_is_a_number() -> None:
    # YAML 1.1 parses "1e-3" as a string; float fields accept it, and reject non-finite text.
    assert load_config(PipelineConfig, overrides=["buckets.fps=2.4e1"]).buckets.fps == 24.0
    assert load_config(PipelineConfig, overrides=["buckets.fps=24e0"]).buckets.fps == 24.0
    with pytest.raises(ConfigError, match="finite"):
        load_config(PipelineConfig, overrides=["buckets.fps=nan"])
    with pytest.raises(ConfigError, match="finite"):
        load_config(PipelineConfig, overrides=["buckets.fps=.inf"])


def test_empty_override_value_is_empty_string() -> None:
    assert load_config(PipelineConfig, overrides=["output.uri="]).output.uri == ""


@pytest.mark.parametrize(
    ("override", "field_name"),
    [
        ("buckets.fps=fast", "buckets.fps"),
        ("buckets.fps=true", "buckets.fps"),  # bool is not a number here
        ("compute.caption_actors=2.5", "compute.caption_actors"),
        ("compute.caption_actors=true", "compute.caption_actors"),
        ("input.sniff_content=1", "input.sniff_content"),
        ("buckets.num_frames=17", "buckets.num_frames"),  # scalar where a list is needed
        ("buckets.num_frames=[1, x]", "buckets.num_frames[1]"),
        ("output.uri=[a, b]", "output.uri"),
        ("buckets={fps: 4, num_frames: 9}", "buckets.num_frames"),
    ],
)
def test_wrong_types_are_rejected_naming_the_field(override: str, field_name: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, overrides=[override])
    assert str(e.value).startswith(field_name + ":"), str(e.value)


def test_literal_rejects_unknown_choice_and_lists_choices() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, overrides=["decode.backend=ffmpeg"])
    msg = str(e.value)
    assert msg.startswith("decode.backend:") and "'ffmpeg'" in msg
    assert _names_all(msg, ["auto", "decord", "pyav"])
    assert load_config(PipelineConfig, overrides=["decode.backend=pyav"]).decode.backend == "pyav"


def test_ad_hoc_tree_types_optional_and_dict() -> None:
    cfg = from_dict(Outer, {"inner": {"limit": 3, "tags": ["x", "y"], "ratio": 1}, "weights": {"a": 2}})
    assert cfg.inner.limit == 3 and cfg.inner.tags == ["x", "y"]
    assert cfg.inner.ratio == 1.0 and type(cfg.inner.ratio) is float
    assert cfg.weights == {"a": 2.0} and type(cfg.weights["a"]) is float
    assert from_dict(Outer, {"inner": {"limit": None}}).inner.limit is None
    with pytest.raises(ConfigError, match=r"^inner\.limit:"):
        from_dict(Outer, {"inner": {"limit": "many"}})
    with pytest.raises(ConfigError, match=r"^weights\.b:"):
        from_dict(Outer, {"weights": {"b": "heavy"}})
    with pytest.raises(ConfigError, match=r"^inner\.mode:.*'slow'"):
        from_dict(Outer, {"inner": {"mode": "slow"}})
    with pytest.raises(ConfigError, match=r"^inner: expected a mapping with keys \['size_px'"):
        from_dict(Outer, {"inner": 5})


def test_yaml_file_and_overrides_merge_override_wins(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("buckets:\n  fps: 12\n  num_frames: [1, 5]\noutput:\n  uri: /data/out\n")
    cfg = load_config(PipelineConfig, path, ["buckets.fps=6", "buckets.resolutions_px=[64]"])
    assert cfg.buckets.fps == 6.0  # override wins
    assert cfg.buckets.num_frames == [1, 5]  # file value kept beside the override
    assert cfg.buckets.resolutions_px == [64]
    assert cfg.output.uri == "/data/out"
    assert cfg.buckets.size_multiple_px == 16  # default where neither says anything
    # Overrides apply in order: the last one wins.
    assert load_config(PipelineConfig, path, ["buckets.fps=6", "buckets.fps=3"]).buckets.fps == 3.0


def test_validate_hooks_run() -> None:
    with pytest.raises(ValueError, match=r"buckets\.fps must be > 0"):
        load_config(PipelineConfig, overrides=["buckets.fps=0"])
    with pytest.raises(ValueError, match=r"output\.val_fraction"):
        load_config(PipelineConfig, overrides=["output.val_fraction=1.0"])
    with pytest.raises(ValueError, match=r"aspect ratio '16x9'"):
        load_config(PipelineConfig, overrides=["buckets.aspect_ratios=['16x9']"])
    with pytest.raises(ValueError, match="inner.size_px must be even"):
        from_dict(Outer, {"inner": {"size_px": 7}})


# ---------------------------------------------------------------------------
# Hash, dump, round trip, files
# ---------------------------------------------------------------------------


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    base = config_hash(PipelineConfig())
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert config_hash(PipelineConfig()) == base
    # The same values spelled differently (int vs float, via a file, via overrides) hash the same.
    assert config_hash(load_config(PipelineConfig, overrides=["buckets.fps=8"])) == base
    path = tmp_path / "same.yaml"
    path.write_text("buckets:\n  fps: 8.0\n")
    assert config_hash(load_config(PipelineConfig, path)) == base
    # Any value change changes it.
    assert config_hash(load_config(PipelineConfig, overrides=["buckets.fps=9"])) != base
    assert config_hash(load_config(PipelineConfig, overrides=["caption.clip.seed=1"])) != base
    assert config_hash(load_config(PipelineConfig, overrides=["buckets.num_frames=[1, 9]"])) != base
    # It is the sha256 of the canonical (sorted-key) JSON, so it does not depend on field order.
    assert base == hashlib.sha256(config_json(PipelineConfig()).encode()).hexdigest()
    assert json.loads(config_json(PipelineConfig())) == to_dict(PipelineConfig())


def test_dump_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        PipelineConfig,
        overrides=["buckets.fps=24", "buckets.num_frames=[1, 17, 33]", "decode.backend=pyav",
                   "input.sniff_content=false", "output.uri='/tmp/x: y'", "caption.clip.seed=7"],
    )
    assert cfg.output.uri == "/tmp/x: y"
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(PipelineConfig, path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    # Ad-hoc tree with Optional / dict / Literal fields too.
    adhoc = from_dict(Outer, {"name": "n: 1", "inner": {"limit": None, "mode": "exact"}, "weights": {"k": 0.25}})
    path.write_text(dump_yaml(adhoc))
    assert load_config(Outer, path) == adhoc


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml.* does not exist"):
        load_config(PipelineConfig, missing)


def test_invalid_yaml_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("buckets:\n  fps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.* is not valid YAML"):
        load_config(PipelineConfig, path)


def test_yaml_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PipelineConfig, path)


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(PipelineConfig, path) == PipelineConfig()


@pytest.mark.parametrize("key", ["cut_resources", "writer_resources"])
def test_cut_and_writer_resources_must_be_custom_and_positive(key: str) -> None:
    from pipeline.settings import PipelineConfig

    cfg = load_config(PipelineConfig, None, [f"compute.{key}={{cpu_node: 1}}"])
    assert getattr(cfg.compute, key) == {"cpu_node": 1}
    for bad in ("{CPU: 2}", "{cpu_node: 0}", "{cpu_node: lots}", "{cpu_node: true}", "{cpu_node: 0.00001}"):
        with pytest.raises((ConfigError, ValueError), match=key):
            load_config(PipelineConfig, None, [f"compute.{key}={bad}"])
