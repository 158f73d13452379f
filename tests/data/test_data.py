"""Users' own data: image folders, arrays, HDF5 in memory and on disk, group metadata, specs."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ensattr_fast.data import (DataError, Dataset, DiskImages, check_images, load_arrays, load_dataset, load_digits,
                               load_hdf5, load_image_folder, read_unit_metadata)
from ensattr_fast.data import disk as data_module

DIGITS_FINGERPRINT = "a31f849aa0e7a9afae366e305563c2bd809baee1a448c7e141a1f5d150909dd6"


def scaled(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0))


# --------------------------------------------------------------------------------- image folders


@pytest.fixture
def art(tmp_path):
    """10 group folders of two 32x32 RGB PNGs each, plus JPEGs of other sizes in three groups."""
    root = tmp_path / "art"
    rng = np.random.default_rng(0)
    pngs = {}
    for g in range(10):
        folder = root / f"artist{g}"
        folder.mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.png")
            pngs[f"artist{g}/{k}.png"] = pixels
    jpeg_colors = {"artist0/wide.jpg": ((48, 40), (200, 30, 90)), "artist4/tall.jpeg": ((20, 64), (10, 220, 40)),
                   "artist9/sub/deep.JPG": ((70, 50), (128, 128, 250))}
    for rel, (size, color) in jpeg_colors.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(root / rel, quality=95)
    (root / "artist3" / "notes.txt").write_text("not an image")
    (root / "artist3" / ".hidden.png").write_bytes(b"junk")
    return root, pngs, jpeg_colors


def test_folder_with_group_subfolders(art):
    root, pngs, jpegs = art
    data = load_image_folder(root, resolution=32)
    expected_names = sorted([*pngs, *jpegs])
    assert data.example_names == tuple(expected_names)
    assert data.groups == tuple(name.split("/")[0] for name in expected_names)
    assert sorted(set(data.groups)) == [f"artist{g}" for g in range(10)]
    assert len(data) == 23 and data.images.shape == (23, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.in_memory and data.labels is None and data.name == "art"
    for name, pixels in pngs.items():  # 32x32 PNGs are taken exactly
        i = data.example_names.index(name)
        torch.testing.assert_close(data.images[i], scaled(pixels.transpose(2, 0, 1)), rtol=0, atol=0)
    for name, (_, color) in jpegs.items():  # solid JPEGs of other sizes come out close to their colour
        i = data.example_names.index(name)
        target = scaled(np.array(color, dtype=np.uint8))[:, None, None].expand(3, 32, 32)
        assert (data.images[i] - target).abs().max() < 6 / 127.5
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_crop_takes_the_centre_and_resize_squeezes(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)  # H 16, W 40
    Image.fromarray(wide).save(root / "wide.png")
    big = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(big).save(root / "z_big.png")

    crop = load_image_folder(root, resolution=16, fit="crop")
    assert crop.groups is None and crop.example_names == ("wide.png", "z_big.png")
    # the short side is already 16: only the centre crop, columns 12..28
    torch.testing.assert_close(crop.images[0], scaled(wide[:, 12:28].transpose(2, 0, 1)), rtol=0, atol=0)
    # 64x96 -> 16x24 then columns 4..20, as PIL does it
    small = np.asarray(Image.fromarray(big).resize((24, 16), Image.Resampling.BICUBIC, reducing_gap=3.0))
    torch.testing.assert_close(crop.images[1], scaled(small[:, 4:20].transpose(2, 0, 1)), rtol=0, atol=0)

    resize = load_image_folder(root, resolution=16, fit="resize")
    squeezed = np.asarray(Image.fromarray(wide).resize((16, 16), Image.Resampling.BICUBIC, reducing_gap=3.0))
    torch.testing.assert_close(resize.images[0], scaled(squeezed.transpose(2, 0, 1)), rtol=0, atol=0)
    assert not torch.equal(resize.images[0], crop.images[0])


def test_grayscale_folder(art):
    root, pngs, _ = art
    gray = load_image_folder(root, resolution=32, channels=1)
    assert gray.images.shape == (23, 1, 32, 32)
    name = "artist2/1.png"
    expected = np.asarray(Image.fromarray(pngs[name]).convert("L"))
    torch.testing.assert_close(gray.images[gray.example_names.index(name), 0], scaled(expected), rtol=0, atol=0)


def test_folder_errors(tmp_path, art):
    with pytest.raises(DataError, match="no image folder at .*missing"):
        load_image_folder(tmp_path / "missing", 32)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images \(.png, .jpg, .jpeg\) found under .*empty"):
        load_image_folder(empty, 32)
    root, _, _ = art
    (root / "artist3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read image artist3/broken.png"):
        load_image_folder(root, 32)
    (root / "artist3" / "broken.png").unlink()
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    with pytest.raises(DataError, match=r"mixes images directly in the folder \(loose.png\)"):
        load_image_folder(root, 32)
    with pytest.raises(DataError, match="fit must be 'crop' or 'resize'"):
        load_image_folder(root, 32, fit="pad")
    with pytest.raises(DataError, match="channels must be 1"):
        load_image_folder(root, 32, channels=4)


# ------------------------------------------------------------------------------------- arrays


def test_npy_grayscale_uint8(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (5, 6, 7), dtype=np.uint8)
    np.save(tmp_path / "gray.npy", pixels)
    data = load_arrays(tmp_path / "gray.npy")
    assert data.images.shape == (5, 1, 6, 7) and data.name == "gray" and data.labels is None
    torch.testing.assert_close(data.images[:, 0], scaled(pixels), rtol=0, atol=0)
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.example_names == ("0", "1", "2", "3", "4")


def test_npz_channels_last_with_labels(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=pixels, labels=np.arange(6) % 2)
    data = load_arrays(tmp_path / "rgb.npz")
    assert data.images.shape == (6, 3, 10, 12)
    torch.testing.assert_close(data.images, scaled(pixels.transpose(0, 3, 1, 2)), rtol=0, atol=0)
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1] and data.labels.dtype == torch.int64
    # channels first with C = 3 stays as it is
    np.savez(tmp_path / "first.npz", pics=pixels.transpose(0, 3, 1, 2))
    first = load_arrays(tmp_path / "first.npz", key="pics")
    assert torch.equal(first.images, data.images) and first.labels is None


def test_float_arrays_in_range_are_taken_and_outside_refused(tmp_path):
    values = np.random.default_rng(4).uniform(-1, 1, (4, 3, 5, 5)).astype(np.float64)
    np.save(tmp_path / "ok.npy", values)
    data = load_arrays(tmp_path / "ok.npy")
    torch.testing.assert_close(data.images, torch.from_numpy(values.astype(np.float32)), rtol=0, atol=0)
    np.save(tmp_path / "raw.npy", values * 255)
    with pytest.raises(DataError, match=r"far outside \[-1, 1\]: scale your data to \[-1, 1\]"):
        load_arrays(tmp_path / "raw.npy")


def test_latents_with_scale_false(tmp_path):
    latents = np.random.default_rng(5).normal(0, 6, (7, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "latents.npz", z=latents)
    with pytest.raises(DataError, match="scale=False"):
        load_arrays(tmp_path / "latents.npz", key="z")
    data = load_arrays(tmp_path / "latents.npz", key="z", scale=False)
    assert data.data_shape == (4, 8, 8)
    torch.testing.assert_close(data.images, torch.from_numpy(latents), rtol=0, atol=0)


def test_array_errors(tmp_path):
    with pytest.raises(DataError, match="no array file at"):
        load_arrays(tmp_path / "nothing.npy")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"has no array 'images' \(arrays: x\)"):
        load_arrays(tmp_path / "a.npz")
    np.save(tmp_path / "flat.npy", np.zeros((2, 16), np.uint8))
    with pytest.raises(DataError, match=r"must be \[n, H, W\], \[n, C, H, W\] or \[n, H, W, C\], got shape \[2, 16\]"):
        load_arrays(tmp_path / "flat.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="empty is empty"):
        load_arrays(tmp_path / "empty.npy")
    bad = np.zeros((3, 1, 4, 4), np.float32)
    bad[2, 0, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"holds NaN or Inf values \(first in image 2\)"):
        load_arrays(tmp_path / "nan.npy")


# --------------------------------------------------------------------------------------- HDF5


def write_h5(path, images, labels=None, name="images", chunks=None):
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=images, chunks=chunks)
        if labels is not None:
            f.create_dataset("labels", data=labels)
    return path


@pytest.fixture
def h5_uint8(tmp_path):
    pixels = np.random.default_rng(6).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    return write_h5(tmp_path / "faces.h5", pixels, labels=np.arange(50) % 5, chunks=(7, 3, 8, 8)), pixels


def test_hdf5_in_memory_and_on_disk_agree(h5_uint8, monkeypatch):
    path, pixels = h5_uint8
    memory = load_hdf5(path)
    disk = load_hdf5(path, memory_budget=100)
    assert memory.in_memory and not disk.in_memory and isinstance(disk.images, DiskImages)
    assert len(disk) == 50 and disk.data_shape == (3, 8, 8) and disk.images.shape == (50, 3, 8, 8)
    assert disk.images.dtype == torch.float32 and disk.images.stored_dtype == np.uint8
    torch.testing.assert_close(memory.images, scaled(pixels), rtol=0, atol=0)
    everything = torch.arange(50)
    assert torch.equal(disk.read(everything), memory.read(everything))
    assert torch.equal(disk.labels, memory.labels) and disk.labels.tolist()[:6] == [0, 1, 2, 3, 4, 0]
    assert disk.example_names == memory.example_names == tuple(str(i) for i in range(50))
    # the fingerprint streams blocks (forced small here) and equals the in-memory one
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 3 * 8 * 8 * 4 * 9)  # 9 rows a block
    assert disk.images.chunk_rows() == 9
    assert disk.fingerprint() == memory.fingerprint() == Dataset(scaled(pixels)).fingerprint()
    blocks = list(disk.images.chunks(9))
    assert [len(b) for b in blocks] == [9, 9, 9, 9, 9, 5]
    assert torch.equal(torch.cat(blocks), memory.images)


@pytest.mark.parametrize("index", [[40, 3, 3, 17, 0, 49, 3], [5], [], list(range(49, -1, -1)), [0, 1, 2, 3], [2, 45]])
@pytest.mark.parametrize("slab_bytes", [0, 1 << 20], ids=["rows", "slab"])
def test_disk_reads_unsorted_and_repeated_indices(h5_uint8, index, slab_bytes, monkeypatch):
    monkeypatch.setattr(data_module, "SLAB_BYTES", slab_bytes)
    path, pixels = h5_uint8
    disk = load_hdf5(path, memory_budget=0)
    got = disk.read(torch.tensor(index, dtype=torch.int64))
    assert got.shape == (len(index), 3, 8, 8) and got.dtype == torch.float32
    expected = scaled(pixels)[torch.tensor(index, dtype=torch.int64)]
    assert torch.equal(got, expected)
    assert torch.equal(Dataset(scaled(pixels)).read(torch.tensor(index, dtype=torch.int64)), expected)


def test_disk_read_errors(h5_uint8):
    disk = load_hdf5(h5_uint8[0], memory_budget=0)
    with pytest.raises(DataError, match="index 50 out of range"):
        disk.read(torch.tensor([1, 50]))
    with pytest.raises(DataError, match="index -1 out of range"):
        disk.read(torch.tensor([-1]))
    with pytest.raises(DataError, match="must be integers"):
        disk.read(torch.tensor([1.0]))


def test_disk_reads_from_background_threads(h5_uint8):
    path, pixels = h5_uint8
    disk = load_hdf5(path, memory_budget=0)
    expected = scaled(pixels)
    result = {}
    thread = threading.Thread(target=lambda: result.update(x=disk.read(torch.tensor([9, 1, 9]))))
    thread.start()
    thread.join()
    assert torch.equal(result["x"], expected[[9, 1, 9]])
    rng = np.random.default_rng(7)
    batches = [torch.from_numpy(rng.integers(0, 50, 16)) for _ in range(64)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(disk.read, batches))
    for batch, out in zip(batches, outputs):
        assert torch.equal(out, expected[batch])


def test_hdf5_layouts_floats_and_latents(tmp_path):
    rng = np.random.default_rng(8)
    rgb = rng.integers(0, 256, (12, 9, 10, 3), dtype=np.uint8)  # channels last
    path = write_h5(tmp_path / "hwc.h5", rgb)
    memory, disk = load_hdf5(path), load_hdf5(path, memory_budget=10)
    assert memory.data_shape == disk.data_shape == (3, 9, 10)
    assert torch.equal(disk.read(torch.arange(12)), scaled(rgb.transpose(0, 3, 1, 2)))
    assert torch.equal(memory.images, scaled(rgb.transpose(0, 3, 1, 2)))
    assert memory.fingerprint() == disk.fingerprint() and memory.labels is None

    latents = rng.normal(0, 5, (20, 4, 8, 8)).astype(np.float32)
    path = write_h5(tmp_path / "latents.h5", latents, name="z")
    with pytest.raises(DataError, match="scale your data to"):
        load_hdf5(path, dataset="z", memory_budget=0)
    with pytest.raises(DataError, match="scale your data to"):
        load_hdf5(path, dataset="z")
    for budget in (0, 1 << 20):
        data = load_hdf5(path, dataset="z", memory_budget=budget, scale=False)
        assert data.in_memory == (budget > 0)
        assert torch.equal(data.read(torch.tensor([19, 0, 7])), torch.from_numpy(latents[[19, 0, 7]]))


def test_hdf5_nan_in_a_later_chunk_is_found(tmp_path, monkeypatch):
    values = np.random.default_rng(9).uniform(-1, 1, (40, 1, 4, 4)).astype(np.float32)
    values[37, 0, 2, 2] = np.inf
    values[38, 0, 0, 0] = np.nan
    path = write_h5(tmp_path / "bad.h5", values)
    monkeypatch.setattr(data_module, "CHUNK_BYTES", 4 * 4 * 4 * 10)  # 10 rows a block
    with pytest.raises(DataError, match=r"bad holds NaN or Inf values \(first in image 37\)"):
        load_hdf5(path, memory_budget=0)
    with pytest.raises(DataError, match=r"bad holds NaN or Inf values \(first in image 37\)"):
        load_hdf5(path)
    disk = DiskImages(path)
    with pytest.raises(DataError, match=r"on disk holds NaN or Inf values \(first in image 37\)"):
        check_images(disk, "on disk")


def test_hdf5_errors(tmp_path, h5_uint8):
    with pytest.raises(DataError, match="no HDF5 file at"):
        load_hdf5(tmp_path / "missing.h5")
    (tmp_path / "fake.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="is not a readable HDF5 file"):
        load_hdf5(tmp_path / "fake.h5")
    with pytest.raises(DataError, match=r"has no dataset 'pictures' \(datasets: images, labels\)"):
        load_hdf5(h5_uint8[0], dataset="pictures")
    with pytest.raises(DataError, match="has no labels dataset 'classes'"):
        load_hdf5(h5_uint8[0], labels="classes")
    assert load_hdf5(h5_uint8[0], labels=None).labels is None
    write_h5(tmp_path / "empty.h5", np.zeros((0, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match="empty is empty"):
        load_hdf5(tmp_path / "empty.h5", memory_budget=0)


# ----------------------------------------------------------------------------------- metadata


def test_metadata_csv_by_name_and_by_index(art, tmp_path):
    root, _, _ = art
    data = load_image_folder(root, 16)
    rows = ["example,group"] + [f"{name},{'early' if name < 'artist5' else 'late'}" for name in data.example_names]
    (tmp_path / "by_name.csv").write_text("\n".join(rows) + "\n")
    groups = read_unit_metadata(tmp_path / "by_name.csv", data)
    assert groups == tuple("early" if name < "artist5" else "late" for name in data.example_names)
    assert groups.count("early") == 12 and groups.count("late") == 11

    arrays = Dataset(torch.zeros(4, 1, 2, 2))  # no example names: indices
    (tmp_path / "by_index.csv").write_text("group,example,extra\nb,3,x\na,0,x\na,1,y\nb,2,z\n")
    assert read_unit_metadata(tmp_path / "by_index.csv", arrays) == ("a", "a", "b", "b")
    # a data set named by path also takes indices
    mixed = ["example,group"] + [f"{i},g{i % 3}" for i in range(len(data))]
    (tmp_path / "mixed.csv").write_text("\n".join(mixed))
    assert read_unit_metadata(tmp_path / "mixed.csv", data) == tuple(f"g{i % 3}" for i in range(len(data)))


def test_metadata_json_object_and_list(tmp_path):
    data = Dataset(torch.zeros(3, 1, 2, 2), example_names=["x.png", "y.png", "z.png"])
    (tmp_path / "object.json").write_text(json.dumps({"z.png": "bob", "x.png": "ann", "1": 7}))
    assert read_unit_metadata(tmp_path / "object.json", data) == ("ann", "7", "bob")
    (tmp_path / "list.json").write_text(json.dumps(["p", "q", "p"]))
    assert read_unit_metadata(tmp_path / "list.json", data) == ("p", "q", "p")
    (tmp_path / "short.json").write_text(json.dumps(["p", "q"]))
    with pytest.raises(DataError, match="lists 2 groups for the 3 examples"):
        read_unit_metadata(tmp_path / "short.json", data)


def test_metadata_errors(tmp_path):
    data = Dataset(torch.zeros(3, 1, 2, 2), name="toy", example_names=["x.png", "y.png", "z.png"])
    (tmp_path / "missing.csv").write_text("example,group\nx.png,a\nz.png,\n")
    with pytest.raises(DataError, match=r"gives no group for example y.png \(2 of 3 examples without a group\)"):
        read_unit_metadata(tmp_path / "missing.csv", data)
    (tmp_path / "unknown.json").write_text(json.dumps({"x.png": "a", "y.png": "a", "z.png": "b", "w.png": "c",
                                                       "9": "d"}))
    with pytest.raises(DataError, match="names 2 examples not in toy: w.png, 9"):
        read_unit_metadata(tmp_path / "unknown.json", data)
    (tmp_path / "header.csv").write_text("name,artist\nx.png,a\n")
    with pytest.raises(DataError, match="needs a header with columns 'example' and 'group'"):
        read_unit_metadata(tmp_path / "header.csv", data)
    (tmp_path / "twice.csv").write_text("example,group\nx.png,a\n0,b\ny.png,a\nz.png,a\n")
    with pytest.raises(DataError, match="gives example x.png two groups: a and b"):
        read_unit_metadata(tmp_path / "twice.csv", data)
    with pytest.raises(DataError, match="no metadata file at"):
        read_unit_metadata(tmp_path / "nope.csv", data)


# -------------------------------------------------------------------------------------- specs


def test_load_dataset_round_trip_for_every_kind(art, tmp_path, monkeypatch, h5_uint8):
    monkeypatch.chdir(tmp_path)
    root, _, _ = art
    digits = load_dataset(json.loads(json.dumps({"kind": "digits"})))
    assert len(digits) == 1797 and digits.fingerprint() == DIGITS_FINGERPRINT == load_digits().fingerprint()

    (tmp_path / "groups.json").write_text(json.dumps([f"half{i % 2}" for i in range(23)]))
    spec = {"kind": "folder", "path": "art", "resolution": 16, "channels": 1, "fit": "resize",
            "metadata": "groups.json"}
    folder = load_dataset(json.loads(json.dumps(spec)))
    direct = load_image_folder(root, 16, channels=1, fit="resize")
    assert folder.fingerprint() == direct.fingerprint() and folder.example_names == direct.example_names
    assert folder.groups == tuple(f"half{i % 2}" for i in range(23)) != direct.groups
    assert load_dataset({"kind": "folder", "path": "art", "resolution": 16}).groups == direct.groups == \
        load_image_folder(root, 16).groups

    latents = np.random.default_rng(10).normal(0, 3, (6, 4, 2, 2)).astype(np.float32)
    np.savez("latents.npz", z=latents)
    arrays = load_dataset({"kind": "arrays", "path": "latents.npz", "key": "z", "scale": False})
    assert torch.equal(arrays.images, torch.from_numpy(latents))

    path, pixels = h5_uint8
    spec = {"kind": "hdf5", "path": path.name, "dataset": "images", "memory_budget": 64, "scale": True}
    on_disk = load_dataset(json.loads(json.dumps(spec)))
    assert not on_disk.in_memory and on_disk.fingerprint() == load_hdf5(path).fingerprint()
    assert torch.equal(on_disk.read(torch.tensor([3, 1])), scaled(pixels[[3, 1]]))
    (tmp_path / "faces.csv").write_text("example,group\n" + "".join(f"{i},p{i // 10}\n" for i in range(50)))
    grouped = load_dataset({"kind": "hdf5", "path": path.name, "metadata": "faces.csv"})
    assert grouped.in_memory and grouped.groups == tuple(f"p{i // 10}" for i in range(50))


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown data kind 'imagenet': one of digits, folder, arrays, hdf5"):
        load_dataset({"kind": "imagenet"})
    with pytest.raises(DataError, match="must be an object with a 'kind'"):
        load_dataset({"path": "x"})
    with pytest.raises(DataError, match=r"needs \['resolution'\]"):
        load_dataset({"kind": "folder", "path": str(tmp_path)})
    with pytest.raises(DataError, match=r"unknown keys \['resoluton'\]"):
        load_dataset({"kind": "folder", "path": str(tmp_path), "resolution": 8, "resoluton": 8})
    with pytest.raises(DataError, match="no image folder at"):
        load_dataset({"kind": "folder", "path": str(tmp_path / "gone"), "resolution": 8})


# ------------------------------------------------------------------------------------ Dataset


def test_dataset_keeps_its_old_api_and_checks_new_fields():
    images = torch.linspace(-1, 1, 4 * 2 * 3 * 3).reshape(4, 2, 3, 3)
    data = Dataset(images, torch.arange(4), name="toy", groups=["a", "b", "a", "b"], example_names=["w", "x", "y", "z"])
    assert data.groups == ("a", "b", "a", "b") and isinstance(data.example_names, tuple)
    assert len(data) == 4 and data.data_shape == (2, 3, 3) and data.in_memory
    assert torch.equal(data.read(torch.tensor([3, 3, 0])), images[[3, 3, 0]])
    old = Dataset(images)
    assert old.groups is None and old.example_names is None and old.fingerprint() == data.fingerprint()
    with pytest.raises(DataError, match="toy: 3 groups for 4 images"):
        Dataset(images, name="toy", groups=["a", "b", "c"])
    with pytest.raises(DataError, match="toy: example name 'x' appears twice"):
        Dataset(images, name="toy", example_names=["w", "x", "x", "z"])
    with pytest.raises(DataError, match="toy: 3 labels for 4 images"):
        Dataset(images, torch.arange(3), name="toy")
    with pytest.raises(DataError, match="toy is empty"):
        Dataset(torch.zeros(0, 1, 2, 2), name="toy")
    with pytest.raises(DataError, match=r"must be a tensor \[n, C, H, W\], got \(4, 18\)"):
        Dataset(images.reshape(4, 18))
    with pytest.raises(dataclasses_frozen_error()):
        data.groups = None


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("layout", [dict(), dict(chunks=(7, 1, 4, 4)), dict(chunks=(7, 1, 2, 4)),
                                    dict(chunks=(5, 1, 4, 4), compression="gzip")])
def test_disk_rows_equal_memory_for_every_storage_layout(tmp_path, layout):
    """Contiguous and whole-row chunked data are gathered from the mapped file, other layouts
    (partial-row chunks, compression) through h5py: the same values either way."""
    images = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("images", data=images.numpy(), **layout)
    disk = DiskImages(tmp_path / "d.h5")
    index = torch.tensor([39, 0, 7, 7, 21, 6, 8, 33])
    assert torch.equal(disk.read(index), images[index])
    mapped = disk._byte_map() is not None
    assert mapped == ("compression" not in layout and layout.get("chunks", (0, 1, 4, 4))[1:] == (1, 4, 4))


def test_the_fingerprint_covers_the_embedding_conditions():
    """Text-conditioned members train on the embeddings too: other embeddings are other data,
    while data without any keeps the fingerprint of its images alone."""
    g = torch.Generator().manual_seed(0)
    images, conditions = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.randn(6, 2, 3, generator=g)
    bare = Dataset(images)
    with_conditions = Dataset(images, conditions=conditions)
    assert bare.fingerprint() == Dataset(images.clone()).fingerprint()
    assert with_conditions.fingerprint() == Dataset(images, conditions=conditions.clone()).fingerprint()
    assert with_conditions.fingerprint() != bare.fingerprint()
    assert with_conditions.fingerprint() != Dataset(images, conditions=conditions.flip(0)).fingerprint()
