"""TFDS datasets (array_record) built once per fingerprint, read back as random-access sources.

One generic builder serves every record format. `build_dataset` writes a dataset from split
generators of (key, example) under `data_dir/<name>/<fingerprint>/`, or reuses it when a
complete one is there: the callers' fingerprints hash everything the examples depend on, so
the same inputs reuse the build and changed inputs build a fresh copy beside it. Two callers
feed it:
  `text_sources` streams pretraining JSON-lines files through a `RecordSpec` (fingerprint:
      the spec and the files' content);
  `build_example_source` stores examples already in memory (fingerprint: the examples):
      `dialogue_sources` parses SFT, comparison and prompt files into records, reporting
      every bad line by file and line, and hands their examples over directly.
Splits read back as `RecordSource`s. Datasets are written as array_record (no TensorFlow
needed) and read with `as_data_source()`; the tfrecord and parquet formats and `as_dataset`
are avoided (ENV-NOTES.md).

tensorflow_datasets is imported lazily, so this module imports on machines without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from instructjax.data import jsonl

BUILDER_VERSION = "1.0.0"  # part of every fingerprint
# Feature kinds a dataset may store, and what each becomes when read back.
FEATURE_KINDS = ("text", "int", "float", "text_list", "int_list", "float_list")


def check_features(spec_name: str, features: Mapping[str, str]) -> None:
    """Raises ValueError naming the first feature whose kind is not in FEATURE_KINDS."""
    for field, kind in features.items():
        if kind not in FEATURE_KINDS:
            raise ValueError(f"spec {spec_name!r}: feature {field!r} has unknown kind "
                             f"{kind!r}; valid kinds: {FEATURE_KINDS}")


def check_dataset_name(name: str) -> None:
    """Raises ValueError unless `name` is a plain directory name (the dataset's cache dir)."""
    if not name or os.sep in name or name in (".", ".."):
        raise ValueError(f"dataset name must be a plain directory name, got {name!r}")


class RecordSource:
    """Random-access view of one split whose records are dicts with str text fields.

    TFDS returns text as UTF-8 bytes; this decodes them so that consumers see the same
    Python types as in the JSON records. Satisfies grain's RandomAccessDataSource protocol.

    Attributes:
        skipped: `jsonl.SkipReport` of the records the spec left out of this split (counted
            in the split the input files were given for, not in a held-out split).
    """

    def __init__(self, source: Any, features: Mapping[str, str], description: str,
                 skipped: jsonl.SkipReport = jsonl.SkipReport()):
        self._source = source
        self._features = dict(features)
        self._description = description
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {k: _decode(v, self._features.get(k, "")) for k, v in self._source[index].items()}

    def __repr__(self) -> str:
        return f"RecordSource({self._description}, {len(self)} records)"


def _decode(value: Any, kind: str) -> Any:
    if kind == "text":
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if kind == "text_list":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]
    if kind in ("int", "float"):
        return value.item() if isinstance(value, np.generic) else value
    if kind in ("int_list", "float_list"):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


def holdout_sizes(total: int, percent: int, files: Sequence[str]) -> tuple[int, int]:
    """(kept, held): the last `percent`% of `total` records, at least one, are held out.

    Raises:
        jsonl.DataFormatError: naming `files` when that leaves nothing to keep.
    """
    held = max(1, math.ceil(total * percent / 100))
    if held >= total:
        raise jsonl.DataFormatError(
            f"{jsonl.describe_paths(files)}: holding out {percent}% of the {total} record(s) "
            f"as the eval split leaves no train records; give separate eval files "
            f"(data.eval_path), more records, or eval_percent=0 (no eval split)")
    return total - held, held


def _tfds():
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("building datasets needs tensorflow-datasets "
                          "(pip install -e '.' installs it)") from e
    tfds.disable_progress_bar()  # its bars garble the training progress lines
    return tfds


def _features_dict(tfds, features: Mapping[str, str]):
    scalar = {"text": tfds.features.Text(), "int": tfds.features.Scalar(np.int64),
              "float": tfds.features.Scalar(np.float32)}
    out = {}
    for field, kind in features.items():
        if kind.endswith("_list"):
            out[field] = tfds.features.Sequence(scalar[kind[:-len("_list")]])
        else:
            out[field] = scalar[kind]
    return tfds.features.FeaturesDict(out)


@functools.cache
def _builder_class():
    """The builder class, defined on first use so that importing this module needs no TFDS."""
    tfds = _tfds()

    class JsonlRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One TFDS split per entry of `make_splits()`: split -> iterable of (key, example),
        keys sorting in the order the examples are to be stored."""

        VERSION = tfds.core.Version(BUILDER_VERSION)

        # TFDS 4.9.10 locates a builder's source file (only to find URL checksums) with a
        # check that imports the `importlib_resources` backport, absent on Python >= 3.9,
        # and fails for any builder in an installed package. There is nothing to download,
        # hence no checksums file: say there is no code path.
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, description: str, features: Mapping[str, str],
                     metadata: Mapping[str, Any], make_splits: Callable[[], Mapping[str, Any]],
                     data_dir: str):
            self._description = description
            self._features = dict(features)
            self._metadata = dict(metadata)
            self._make_splits = make_splits  # called only when TFDS builds
            super().__init__(data_dir=data_dir, file_format="array_record")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=self._description,
                features=_features_dict(tfds, self._features),
                # Keep input order, so record i of a split is the i-th line read: easy to
                # trace back; shuffling is the loaders' job.
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(**self._metadata),
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # local data only, nothing to download
            return {split: self._generate_examples(examples)
                    for split, examples in self._make_splits().items()}

        def _generate_examples(self, examples):
            yield from examples

    return JsonlRecords


def build_dataset(builder_dir: str, *, description: str, features: Mapping[str, str],
                  metadata: Mapping[str, Any], make_splits: Callable[[], Mapping[str, Any]]):
    """Builds a dataset in `builder_dir` unless a complete one is there.

    Args:
        builder_dir: `data_dir/<name>/<fingerprint>`.
        description, metadata: stored in the dataset's info (metadata JSON-able).
        features: example field -> kind, one of FEATURE_KINDS.
        make_splits: () -> {split: iterable of (key, example)}, called only when building;
            keys sort in the order the examples are stored in.

    Returns:
        split -> TFDS random-access data source (text as bytes; `RecordSource` decodes).
    """
    builder = _builder_class()(description=description, features=features, metadata=metadata,
                               make_splits=make_splits, data_dir=builder_dir)
    builder.download_and_prepare()  # returns at once when the dataset is already complete
    return builder.as_data_source()


# ------------------------------------------------------------------------------ in memory

def _examples_fingerprint(spec_name: str, features: Mapping[str, str],
                          split_examples: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    h = hashlib.sha256(json.dumps({"spec": spec_name, "features": dict(features),
                                   "version": BUILDER_VERSION}, sort_keys=True).encode())
    for split in sorted(split_examples):
        h.update(f"\0split={split}".encode())
        for example in split_examples[split]:
            h.update(json.dumps(example, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:16]


def build_example_source(spec_name: str, features: Mapping[str, str],
                         split_examples: Mapping[str, Sequence[Mapping[str, Any]]],
                         data_dir: str | os.PathLike, *, name: str,
                         metadata: Mapping[str, Any] | None = None) -> dict[str, RecordSource]:
    """Builds (once) a TFDS dataset of examples held in memory and returns its splits.

    Args:
        spec_name: identifies the example format in the cache key (like `RecordSpec.name`).
        features: example field -> kind, one of FEATURE_KINDS.
        split_examples: split -> its examples in order (dicts with exactly the `features`
            keys, JSON-able values); every split needs at least one.
        data_dir: cache root; the dataset goes to `data_dir/name/<fingerprint>/`, the
            fingerprint hashing `spec_name`, `features` and every example, so the same
            examples reuse the build and any change builds a fresh copy beside it.
        name: dataset name (a directory name).
        metadata: JSON-able notes stored with the dataset (e.g. the input files).

    Returns:
        split -> `RecordSource` of example dicts with `features` keys, in the given order.

    Raises:
        ValueError: a bad name or feature kind, or a split without examples.
    """
    check_dataset_name(name)
    check_features(spec_name, features)
    empty = [split for split, examples in split_examples.items() if not examples]
    if empty:
        raise ValueError(f"dataset {name!r}: split(s) {empty} hold no examples")
    builder_dir = os.path.join(os.fspath(data_dir), name,
                               _examples_fingerprint(spec_name, features, split_examples))

    def make_splits():
        # Zero-padded indices sort in the given order, which disable_shuffling keeps.
        return {split: ((f"{i:010d}", example) for i, example in enumerate(examples))
                for split, examples in split_examples.items()}

    sources = build_dataset(builder_dir, description=f"{spec_name} records",
                            features=features, metadata=metadata or {},
                            make_splits=make_splits)
    return {split: RecordSource(sources[split], features, f"{name}/{split}")
            for split in split_examples}
