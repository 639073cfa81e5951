"""llmx.formats: safetensors files, Hugging Face folders (single and sharded) and name maps."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from llmx.formats import CheckpointFormatError, hf, name_map, safetensors as st
from llmx.formats.name_map import SAME, Entry, concat, reshape


def some_tensors(rng):
  return {"w": rng.normal(size=(3, 5)).astype(np.float32),
          "half": rng.normal(size=(7,)).astype(np.float16),
          "brain": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
          "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
          "empty": np.zeros((0, 4), np.float32),
          "e4m3": rng.normal(size=(5,)).astype(ml_dtypes.float8_e4m3fn),
          "e5m2": rng.normal(size=(2, 2)).astype(ml_dtypes.float8_e5m2)}


def test_write_read_round_trip_and_the_reference_reader_agrees(tmp_path):
  tensors = some_tensors(np.random.default_rng(0))
  st.write_file(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
  back = st.read_file(tmp_path / "ours.safetensors", allow_non_float=True)
  assert sorted(back) == sorted(tensors)
  for name, x in tensors.items():
    assert back[name].dtype == x.dtype and back[name].shape == x.shape, name
    np.testing.assert_array_equal(back[name], x, err_msg=name)
  infos, metadata = st.read_header(tmp_path / "ours.safetensors")
  assert metadata == {"format": "pt"}
  raw = (tmp_path / "ours.safetensors").read_bytes()  # offsets as the header itself gives them
  n = int.from_bytes(raw[:8], "little")
  for name, entry in json.loads(raw[8:8 + n]).items():
    if name != "__metadata__":
      assert [infos[name].begin, infos[name].end] == [8 + n + o for o in entry["data_offsets"]], name
  # Big-endian and strided arrays are written as the values they hold.
  st.write_file(tmp_path / "odd.safetensors", {"big": np.arange(3, dtype=">f4"),
                                               "strided": np.arange(6.0).reshape(2, 3).T})
  odd = st.read_file(tmp_path / "odd.safetensors")
  np.testing.assert_array_equal(odd["big"], [0, 1, 2])
  np.testing.assert_array_equal(odd["strided"], np.arange(6.0).reshape(2, 3).T)
  # The `safetensors` package reads our file (numpy has no bfloat16 or float8, so without those) ...
  plain = {k: v for k, v in tensors.items() if k not in ("brain", "e4m3", "e5m2")}
  st.write_file(tmp_path / "plain.safetensors", plain)
  theirs = safetensors.numpy.load_file(tmp_path / "plain.safetensors")
  for name, x in plain.items():
    np.testing.assert_array_equal(theirs[name], x, err_msg=name)
  # ... and we read its files.
  safetensors.numpy.save_file(plain, tmp_path / "theirs.safetensors")
  for name, x in st.read_file(tmp_path / "theirs.safetensors", allow_non_float=True).items():
    np.testing.assert_array_equal(x, plain[name], err_msg=name)


def test_rewriting_a_file_keeps_arrays_read_from_it(tmp_path):
  file = tmp_path / "m.safetensors"
  st.write_file(file, {"w": np.ones(4, np.float32), "f8": np.ones(4, ml_dtypes.float8_e4m3fn)})
  infos, _ = st.read_header(file)
  opened = st.read_file(file)  # files opened (mapped), tensors not read yet
  before = opened["w"]
  st.write_file(file, {"w": np.zeros(2, np.float32), "f8": np.zeros(2, ml_dtypes.float8_e4m3fn)})
  np.testing.assert_array_equal(before, np.ones(4))  # still mapped from the replaced file
  for name in ("w", "f8"):  # read after the rewrite, from the replaced file
    np.testing.assert_array_equal(opened[name].astype(np.float32), np.ones(4), err_msg=name)
  np.testing.assert_array_equal(st.read_file(file)["w"], np.zeros(2))
  assert [f.name for f in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
  with pytest.raises(CheckpointFormatError, match=r"m.safetensors: changed since its header was read \(w, f8\)"):
    st.read_tensors(infos.values())


def test_non_float_tensors_are_refused_unless_asked(tmp_path):
  st.write_file(tmp_path / "m.safetensors", {"w": np.ones(2, np.float32), "ids": np.arange(3)})
  with pytest.raises(CheckpointFormatError, match=r"not floating-point tensors: ids \(int64\) in .*m.safetensors"):
    st.read_file(tmp_path / "m.safetensors")
  assert st.read_file(tmp_path / "m.safetensors", allow_non_float=True)["ids"].tolist() == [0, 1, 2]


def test_corrupt_files_are_named(tmp_path):
  st.write_file(tmp_path / "m.safetensors", {"w": np.ones((4, 4), np.float32)})
  raw = (tmp_path / "m.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:-8])  # data shorter than the header says
  # (safetensors checks the layout as a whole, so the message cannot name the tensor)
  with pytest.raises(CheckpointFormatError, match=r"cut.safetensors: not a safetensors file, or a damaged one"):
    st.read_header(tmp_path / "cut.safetensors")
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(CheckpointFormatError, match=r"junk.safetensors: not a safetensors file"):
    st.read_header(tmp_path / "junk.safetensors")
  n = int.from_bytes(raw[:8], "little")
  header = raw[8:8 + n].replace(b'"F32"', b'"Q32"')
  (tmp_path / "dtype.safetensors").write_bytes(raw[:8] + header + raw[8 + n:])
  with pytest.raises(CheckpointFormatError, match=r"dtype.safetensors: not a safetensors file.*Q32"):
    st.read_header(tmp_path / "dtype.safetensors")
  # A dtype safetensors knows but llmx does not read.
  st.write_file(tmp_path / "u8.safetensors", {"w": np.ones(4, np.uint8)})
  raw = (tmp_path / "u8.safetensors").read_bytes()
  n = int.from_bytes(raw[:8], "little")
  header = raw[8:8 + n].replace(b'"U8"', b'"F8_E8M0"')
  (tmp_path / "e8m0.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
  with pytest.raises(CheckpointFormatError, match=r"e8m0.safetensors: bad header entry for tensor 'w'.*'F8_E8M0'"):
    st.read_header(tmp_path / "e8m0.safetensors")
  # An absurd header length fails at once, in one line, without allocating it.
  for length in (2**63, 2**40, 10**9):
    (tmp_path / "huge.safetensors").write_bytes(length.to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointFormatError, match=r"huge.safetensors: not a safetensors file") as e:
      st.read_header(tmp_path / "huge.safetensors")
    assert "\n" not in str(e.value)
  with pytest.raises(CheckpointFormatError, match=r"missing.safetensors: cannot read"):
    st.read_header(tmp_path / "missing.safetensors")


def test_write_errors_are_named(tmp_path):
  with pytest.raises(CheckpointFormatError, match=r"c.safetensors: cannot write dtypes safetensors lacks: c \(complex128\)"):
    st.write_file(tmp_path / "c.safetensors", {"c": np.ones(2, np.complex128)})
  with pytest.raises(CheckpointFormatError, match=r"nowhere/m.safetensors: cannot write"):
    st.write_file(tmp_path / "nowhere" / "m.safetensors", {"w": np.ones(2, np.float32)})
  (tmp_path / "d.safetensors").mkdir()  # written, but cannot be renamed over a folder
  with pytest.raises(CheckpointFormatError, match=r"d.safetensors: cannot write"):
    st.write_file(tmp_path / "d.safetensors", {"w": np.ones(2, np.float32)})
  assert [f.name for f in tmp_path.iterdir()] == ["d.safetensors"]  # no temporary file left


def test_sharded_folder_reads_like_a_single_file(tmp_path):
  tensors = {f"layer.{i}.w": np.full((4, 8), i, np.float32) for i in range(5)}
  hf.write_checkpoint(tmp_path / "one", tensors, {"model_type": "toy"})
  hf.write_checkpoint(tmp_path / "sharded", tensors, {"model_type": "toy"}, max_shard_bytes=300)
  files = hf.weight_files(tmp_path / "sharded")
  assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  assert not (tmp_path / "sharded" / hf.SINGLE).exists()
  assert hf.read_config(tmp_path / "sharded") == {"model_type": "toy"}
  one, sharded = hf.read_headers(tmp_path / "one"), hf.read_headers(tmp_path / "sharded")
  assert sorted(one) == sorted(sharded) == sorted(tensors)
  assert {i.file.name for i in sharded.values()} == {f.name for f in files}
  for name, x in st.read_tensors(sharded.values()).items():
    np.testing.assert_array_equal(x, tensors[name], err_msg=name)
  # An index that sends a tensor to the wrong shard is caught, not followed.
  index = json.loads((tmp_path / "sharded" / hf.INDEX).read_text())
  index["weight_map"]["layer.0.w"] = files[2].name
  (tmp_path / "sharded" / hf.INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointFormatError, match=r"index.json disagrees with its shards.*layer.0.w"):
    hf.read_headers(tmp_path / "sharded")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "{tmp}/outside.safetensors",
                                   "sub/../../outside.safetensors", "..\\outside.safetensors"])
def test_shard_names_stay_inside_the_folder(tmp_path, shard):
  # The file the index points at exists and is valid: only the name check stands in the way.
  st.write_file(tmp_path / "outside.safetensors", {"w": np.ones(2, np.float32)})
  folder = tmp_path / "model"
  (folder / "sub").mkdir(parents=True)
  (folder / hf.INDEX).write_text(json.dumps({"weight_map": {"w": shard.format(tmp=tmp_path)}}))
  with pytest.raises(CheckpointFormatError, match=r"index.json: shard .* is not a file name inside"):
    hf.read_headers(folder)


def test_folder_without_safetensors_says_what_it_holds(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(CheckpointFormatError, match=r"no model.safetensors.*pytorch_model.bin are pickle"):
    hf.weight_files(tmp_path)
  with pytest.raises(CheckpointFormatError, match="no config.json"):
    hf.read_config(tmp_path)


class Toy(nnx.Module):
  """Shaped like an attention block with grouped-query heads: q 4 wide, k and v 2 wide each."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.qkv = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Param(jax_normal(seed, (2, 2, 4)))  # [heads, head_dim, d_model]
    self.norms = nnx.List([nnx.LayerNorm(4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs)])


def jax_normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


TOY = [Entry([f"{p}_proj.weight" for p in "qkv"], ("qkv", "kernel"), concat((4, 2, 2), transpose=True)),
       Entry([f"{p}_proj.bias" for p in "qkv"], ("qkv", "bias"), concat((4, 2, 2))),
       Entry("o_proj.weight", ("out",), reshape((4, 4), (2, 2, 4), transpose=True)),
       *(Entry(f"norm.{i}.weight", ("norms", i, "scale"), SAME) for i in range(2))]


def test_name_map_transforms_round_trip(tmp_path):
  toy = Toy(seed=1)
  toy.qkv.bias[...] = jax_normal(2, (8,))
  tensors = name_map.export(toy, TOY)
  assert {k: v.shape for k, v in tensors.items()} == {
      "q_proj.weight": (4, 4), "k_proj.weight": (2, 4), "v_proj.weight": (2, 4),
      "q_proj.bias": (4,), "k_proj.bias": (2,), "v_proj.bias": (2,), "o_proj.weight": (4, 4),
      "norm.0.weight": (4,), "norm.1.weight": (4,)}
  kernel = np.asarray(toy.qkv.kernel[...])
  np.testing.assert_array_equal(tensors["k_proj.weight"], kernel[:, 4:6].T)  # torch [out, in]
  np.testing.assert_array_equal(tensors["o_proj.weight"], np.asarray(toy.out[...]).reshape(4, 4).T)
  hf.write_checkpoint(tmp_path, tensors, {})
  fresh = Toy(seed=3)
  name_map.load(fresh, TOY, hf.read_headers(tmp_path), source=tmp_path)
  for a, b in zip(jax.tree.leaves(nnx.state(toy, nnx.Param)), jax.tree.leaves(nnx.state(fresh, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_name_map_checks_every_header_before_reading_data(tmp_path, monkeypatch):
  tensors = name_map.export(Toy(), TOY)
  tensors["k_proj.weight"] = np.zeros((4, 4), np.float32)       # mis-shaped: k is 2 wide
  tensors["norm.1.weight"] = np.arange(4)                        # integers
  tensors["rotary.inv_freq"] = np.ones(2, np.float32)            # not in the map
  del tensors["v_proj.bias"]
  hf.write_checkpoint(tmp_path, tensors, {})
  infos = hf.read_headers(tmp_path)

  def no_data(*args, **kwargs):
    raise AssertionError("data read before the headers were checked")
  monkeypatch.setattr(st, "read_tensors", no_data)
  model = Toy(seed=5)
  before = np.asarray(model.qkv.kernel[...]).copy()
  with pytest.raises(CheckpointFormatError) as e:
    name_map.load(model, TOY, infos, source=tmp_path)
  message = str(e.value)
  assert message.startswith(f"{tmp_path} does not match its config.json")
  assert "missing weights (1): v_proj.bias" in message
  assert "unexpected weights (1): rotary.inv_freq" in message
  assert "mis-shaped weights (1): k_proj.weight in model.safetensors: (4, 4), expected (2, 4)" in message
  assert "not floating-point weights (1): norm.1.weight in model.safetensors: int64" in message
  np.testing.assert_array_equal(model.qkv.kernel[...], before)

