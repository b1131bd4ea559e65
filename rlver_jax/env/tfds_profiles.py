"""Profile jsonl files as a TFDS dataset (array_record; works without TensorFlow).

    source = profile_data_source(data_dir, "train")          # shipped English set
    profiles = ordered_profiles(source)                      # file order, as Profile objects

Notes:
- Only the array_record path of TFDS works without TensorFlow: `download_and_prepare`,
  `as_data_source`, `tfds.data_source`. `as_dataset` / `tfds.load` need TensorFlow.
- A data source returns records in TFDS's shuffled order, not file order. Each record
  carries `index` (its position among the profiles of its file); `ordered_profiles` sorts by
  it. Sorting by `id` is the other stable choice.
- Text features come back as bytes; `record_to_profile` decodes them.
- The builder config name is derived from the two files' contents (sha256), so editing a
  profile file prepares a fresh dataset instead of silently reusing the old one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlver_jax.env.profiles import SHIPPED, Profile, load_profiles

__all__ = [
    "ProfilesConfig",
    "RlverProfiles",
    "ordered_profiles",
    "profile_data_source",
    "profile_to_record",
    "record_to_profile",
]

PathLike = str | os.PathLike[str]

_TEXT_KEYS = ("id", "player", "scene", "main_cha", "task")


def _digest(*paths: PathLike) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class ProfilesConfig(tfds.core.BuilderConfig):
    """Which jsonl files make the `train` and `test` splits."""

    train_path: str = ""
    test_path: str = ""


def _make_config(train_path: PathLike | None, test_path: PathLike | None) -> ProfilesConfig:
    train = Path(train_path if train_path is not None else SHIPPED["en_train"]).resolve()
    test = Path(test_path if test_path is not None else SHIPPED["en_eval"]).resolve()
    for p in (train, test):
        if not p.is_file():
            raise FileNotFoundError(f"profile file not found: {p}")
    return ProfilesConfig(
        name=f"profiles-{_digest(train, test)}",
        description=f"train: {train.name}, test: {test.name}",
        train_path=str(train),
        test_path=str(test),
    )


class RlverProfiles(tfds.core.GeneratorBasedBuilder):
    """RLVER / SAGE user profiles; `train` and `test` splits from two jsonl files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(
        self,
        *,
        train_path: PathLike | None = None,
        test_path: PathLike | None = None,
        data_dir: PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """`train_path` / `test_path` default to the shipped English sets."""
        kwargs.setdefault("file_format", "array_record")  # the default tfrecord needs TF
        config = kwargs.pop("config", None) or _make_config(train_path, test_path)
        super().__init__(data_dir=None if data_dir is None else str(data_dir), config=config,
                         **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) rather than dataset_info_from_configs, which needs the
        # builder in its own package folder (see ENVIRONMENT.md).
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="User profiles for the RLVER simulated user (persona, scene, hidden need).",
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(np.int64),
                "id": text,
                "player": text,
                "scene": text,
                "main_cha": text,
                "cha_group": tfds.features.Sequence(tfds.features.Text()),
                "task": text,
                # Optional strings: TFDS has no null, so a flag says whether the text is set.
                "first_talk": text,
                "has_first_talk": tfds.features.Scalar(np.bool_),
                "topic": text,
                "has_topic": tfds.features.Scalar(np.bool_),
                # Unknown keys of the source record, as a JSON object.
                "extra_json": text,
            }),
            homepage="https://arxiv.org/abs/2507.03112",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # local files only
        config = self.builder_config
        assert isinstance(config, ProfilesConfig)
        return {
            "train": self._generate_examples(config.train_path),
            "test": self._generate_examples(config.test_path),
        }

    def _generate_examples(self, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        # load_profiles validates and rejects duplicate ids, so ids are unique keys.
        for index, profile in enumerate(load_profiles(path)):
            yield profile.id, profile_to_record(profile, index)


def profile_to_record(profile: Profile, index: int = 0) -> dict[str, Any]:
    """The TFDS example of a profile (`index` = its position in the source file)."""
    return {
        "index": index,
        "id": profile.id,
        "player": profile.player,
        "scene": profile.scene,
        "main_cha": profile.main_cha,
        "cha_group": list(profile.cha_group),
        "task": profile.task,
        "first_talk": profile.first_talk or "",
        "has_first_talk": profile.first_talk is not None,
        "topic": profile.topic or "",
        "has_topic": profile.topic is not None,
        "extra_json": json.dumps(dict(profile.extra), ensure_ascii=False, sort_keys=True),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_profile(record: Mapping[str, Any]) -> Profile:
    """Turns a data-source record (Text as bytes, cha_group as an array) back into a Profile."""
    fields = {k: _text(record[k]) for k in _TEXT_KEYS}
    extra = json.loads(_text(record["extra_json"])) if "extra_json" in record else {}
    return Profile(
        cha_group=tuple(_text(x) for x in record["cha_group"]),
        first_talk=_text(record["first_talk"]) if bool(record["has_first_talk"]) else None,
        topic=_text(record["topic"]) if bool(record["has_topic"]) else None,
        extra=extra,
        **fields,
    )


def profile_data_source(
    data_dir: PathLike,
    split: str,
    train_path: PathLike | None = None,
    test_path: PathLike | None = None,
) -> Sequence[Mapping[str, Any]]:
    """Prepares the dataset under `data_dir` if needed and returns the split's data source.

    `split` is "train" or "test" (TFDS slicing such as "train[:10]" works too). The source
    is a random-access sequence of records in shuffled order; use `ordered_profiles` (or
    sort by `id`) for a stable order.
    """
    builder = RlverProfiles(train_path=train_path, test_path=test_path, data_dir=data_dir)
    builder.download_and_prepare()  # a no-op when this config was already prepared
    return builder.as_data_source(split=split)


def ordered_profiles(source: Sequence[Mapping[str, Any]]) -> list[Profile]:
    """All records of a data source as Profiles, in the order of the source file."""
    records = [source[i] for i in range(len(source))]
    records.sort(key=lambda r: int(r["index"]))
    return [record_to_profile(r) for r in records]
