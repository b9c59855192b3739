"""Our safetensors reader and streaming writer against the safetensors library itself."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from helpers import no_hang
from safetensors.numpy import load_file, save_file

from magistral_jax.checkpoint import CheckpointError
from magistral_jax.checkpoint.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorInfo, split_files


def test_reader_slices_equal_numpy_slices(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(7, 5)).astype(np.float32),
        "b": rng.normal(size=(4, 3, 2, 6)).astype(ml_dtypes.bfloat16),
        "c": rng.normal(size=(9,)).astype(np.float16),
    }
    save_file(tensors, tmp_path / "x.safetensors")
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    cases = [
        ("a", (slice(0, 7), slice(0, 5))),
        ("a", (slice(2, 5), slice(0, 5))),
        ("a", (slice(1, 6), slice(2, 4))),
        ("b", (slice(1, 3), slice(0, 3), slice(1, 2), slice(0, 6))),
        ("b", (slice(0, 4), slice(2, 3), slice(0, 2), slice(3, 5))),
        ("c", (slice(4, 9),)),
    ]
    for name, index in cases:
        np.testing.assert_array_equal(f.read(name, index), tensors[name][index])
    np.testing.assert_array_equal(f.read("b"), tensors["b"])


def test_writer_streams_rows_into_planned_shards(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"t{i}": rng.normal(size=(8, 4)).astype(np.float32) for i in range(5)}
    infos = [TensorInfo(n, np.dtype(np.float32), a.shape) for n, a in arrays.items()]
    files = split_files(infos, 300, "model")  # 128 bytes per tensor: two per file
    assert [f for f, _ in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    writer = SafetensorsWriter(str(tmp_path), files, "model.safetensors.index.json")
    for name, a in arrays.items():
        for start in range(0, 8, 3):
            writer.write(name, a[start : start + 3])
    writer.close()
    loaded = {}
    for fname, _ in files:
        loaded.update(load_file(tmp_path / fname))
    assert loaded.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    assert index["metadata"]["total_size"] == 5 * 128


def test_writer_refuses_misuse(tmp_path):
    infos = [TensorInfo("a", np.dtype(np.float32), (2,)), TensorInfo("b", np.dtype(np.float32), (2,))]
    writer = SafetensorsWriter(str(tmp_path), split_files(infos, None, "x"), None)
    with pytest.raises(ValueError, match="b: written out of order, a expected next"):
        writer.write("b", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="dtype float16 written, float32 planned"):
        writer.write("a", np.zeros(2, np.float16))
    writer.write("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="b: planned but not"):
        writer.close()


def test_header_checks(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: cannot read the safetensors header"):
        SafetensorsFile(str(path))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"w: its byte range in bad\.safetensors does not match shape \(4,\)"):
        SafetensorsFile(str(path))
    header = json.dumps({"w": {"dtype": "I8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"w: dtype I8 in bad\.safetensors is not a supported float type"):
        SafetensorsFile(str(path))


def _write_header(path, header):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)


def _entry(**changes):
    return {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **changes}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"w": _entry(dtype=["F32"])}, r"w: dtype in bad\.safetensors is not a string"),
        ({"w": _entry(dtype={"F32": 1})}, r"w: dtype in bad\.safetensors is not a string"),
        ({"w": _entry(data_offsets=["0", "16"])}, r"w: data_offsets in bad\.safetensors are not two integers"),
        ({"w": _entry(data_offsets=[0.0, 16.0])}, r"w: data_offsets in bad\.safetensors are not two integers"),
        ({"w": _entry(data_offsets=[0, 8, 16])}, r"w: data_offsets in bad\.safetensors are not two integers"),
        ({"w": _entry(data_offsets=[16, 0])}, r"w: data_offsets \[16, 0\] in bad\.safetensors are not an increasing"),
        (
            {"w": _entry(shape=[-2, -2])},
            r"w: shape in bad\.safetensors is not a list of at most 8 non-negative integers",
        ),
        (
            {"w": _entry(shape=[2.0, 2])},
            r"w: shape in bad\.safetensors is not a list of at most 8 non-negative integers",
        ),
        ({"w": _entry(shape="2x2")}, r"w: shape in bad\.safetensors is not a list of at most 8 non-negative integers"),
        ({"w": [1, 2, 3]}, r"w: its safetensors header entry in bad\.safetensors needs dtype, shape and data_offsets"),
        ({"w": _entry(), "__metadata__": [1]}, r"bad\.safetensors: __metadata__ of the safetensors header"),
        # A tensor whose bytes are another's: refused, naming both.
        (
            {"a": _entry(), "b": _entry(shape=[2], data_offsets=[8, 16])},
            r"b: its byte range overlaps a's in bad\.safetensors",
        ),
        (
            {"a": _entry(shape=[4], data_offsets=[16, 32]), "b": _entry(data_offsets=[4, 20])},
            r"a: its byte range overlaps b's in bad\.safetensors",
        ),
        (b"[" * 100_000 + b"]" * 100_000, r"bad\.safetensors: cannot read the safetensors header \(nested too deeply"),
        (b'{"w\xff": 1}', r"bad\.safetensors: cannot read the safetensors header"),
        (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}", r"bad\.safetensors: cannot read the safetensors"),
    ],
)
def test_hostile_headers_are_refused_naming_file_and_tensor(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    _write_header(path, header)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(str(path))


def test_adjacent_and_empty_tensors_are_not_overlaps(tmp_path):
    tensors = {"a": np.arange(4, dtype=np.float32), "e": np.zeros((0, 3), np.float32), "b": np.ones(2, np.float32)}
    save_file(tensors, tmp_path / "ok.safetensors")
    f = SafetensorsFile(str(tmp_path / "ok.safetensors"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(f.read(name), value)


def test_a_fifo_in_place_of_a_safetensors_file_is_refused_not_waited_on(tmp_path):
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    with no_hang(5), pytest.raises(CheckpointError, match=r"model\.safetensors: not a regular file"):
        SafetensorsFile(str(path))
