"""Image–text tables as inputs: Parquet (images as bytes or paths), `datasets` folders written by
`save_to_disk` (its Image feature), imagefolders with metadata.jsonl/csv, and `--columns` —
each checked against the `datasets` library reading the same data; then the errors a user meets."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import make_image, write_jsonl
from PIL import Image
from typer.testing import CliRunner

from unimm.cli import app
from unimm.config import PrepareConfig, build_config
from unimm.data.adapters import iter_decoded_records
from unimm.data.prepare import write_shards
from unimm.data.shards import read_samples
from unimm.data.tables import parse_columns
from unimm.errors import UnimmError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (20 + i % 7, 24, 3), dtype=np.uint8)) for i in range(n)]


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def prepare(inputs, out, **options):
    opts = {"prepare.inputs": [str(p) for p in inputs], "prepare.out": str(out)}
    opts |= {f"prepare.{k}": v for k, v in options.items()}
    write_shards(build_config(PrepareConfig, options=opts), progress=False)
    return list(read_samples(out, split_by_node=False, split_by_worker=False, on_error="fail"))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_parquet_with_image_bytes_and_a_column_mapping(tmp_path):
    """Row groups of 4, images held as JPEG bytes: the shards keep each image's exact bytes
    (decoded alike), its text and its id, in order."""
    images = pictures(10)
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(10)],
            "img": [jpeg(im) for im in images],
            "desc": [f"photo {i}" for i in range(10)],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=4)
    samples = prepare([tmp_path / "t.parquet"], tmp_path / "out", columns="image=img,text=desc,id=key")
    assert [s.id for s in samples] == [f"k{i}" for i in range(10)]
    assert [s.slices[1].text for s in samples] == [f"photo {i}" for i in range(10)]
    for sample, data in zip(samples, table.column("img").to_pylist(), strict=True):
        np.testing.assert_array_equal(pixels(sample.slices[0].image), pixels(Image.open(io.BytesIO(data))))
    with pytest.raises(UnimmError, match=r"no image or text column \(found: key, img, desc\).*--columns"):
        prepare([tmp_path / "t.parquet"], tmp_path / "out2")


def test_parquet_with_image_paths(tmp_path, image_dir):
    table = pa.table(
        {"image": [f"imgs/{i}.jpg" for i in range(6)], "caption": [f"colour {i}" for i in range(6)]}
    )
    pq.write_table(table, tmp_path / "paths.parquet")
    decoded = [s for _, s in iter_decoded_records(tmp_path / "paths.parquet")]
    assert [s.id for s in decoded] == [f"paths-{i}" for i in range(1, 7)]
    for i, sample in enumerate(decoded):
        np.testing.assert_array_equal(
            pixels(sample.slices[0].image), pixels(Image.open(image_dir / f"{i}.jpg"))
        )


def test_a_datasets_folder_reads_as_datasets_reads_it(tmp_path):
    """`save_to_disk` in 2 Arrow files, an Image feature (PNG bytes), one row with two captions:
    every image equals `datasets.load_from_disk`'s, rows in order, a list of captions giving a
    record each."""
    images = pictures(300, seed=1)
    captions = [[f"first {i}", f"second {i}"] if i == 7 else f"caption {i}" for i in range(300)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}
    )
    rows = {"image": images, "text": [c if isinstance(c, list) else [c] for c in captions]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds", num_shards=2)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 2
    oracle = datasets.load_from_disk(str(tmp_path / "ds"))
    decoded = [s for _, s in iter_decoded_records(tmp_path / "ds")]
    assert len(decoded) == 301
    assert [s.id for s in decoded[6:9]] == ["ds-7", "ds-8-1", "ds-8-2"]
    assert [s.slices[1].text for s in decoded[7:9]] == ["first 7", "second 7"]
    texts = [s.slices[1].text for s in decoded if not s.id.startswith("ds-8-")]
    assert texts == [oracle[i]["text"][0] for i in range(300) if i != 7]
    for n, i in enumerate([0, 1, 149, 150, 151, 299]):  # both files, across their batches
        got = decoded[i + (i > 7)]
        np.testing.assert_array_equal(pixels(got.slices[0].image), pixels(oracle[i]["image"]), err_msg=str(n))
    shards = prepare([tmp_path / "ds"], tmp_path / "out", samples_per_shard=128)
    assert len(shards) == 301 and shards[-1].slices[0].image.size == images[-1].size


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_an_imagefolder_reads_as_datasets_imagefolder(tmp_path, metadata, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "photos"
    for i in range(5):
        make_image(folder / f"{i}.png", size=(16 + i, 12), colour=(40 * i, 90, 10), fmt="PNG")
    rows = [{"file_name": f"{i}.png", "text": f"a square {i}"} for i in range(5)]
    if metadata.endswith(".jsonl"):
        write_jsonl(folder / metadata, rows)
    else:
        (folder / metadata).write_text(
            "file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows)
        )
    oracle = datasets.load_dataset(
        "imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c")
    )
    decoded = [s for _, s in iter_decoded_records(folder)]
    assert [s.slices[1].text for s in decoded] == oracle["text"]
    for sample, row in zip(decoded, oracle, strict=True):
        np.testing.assert_array_equal(pixels(sample.slices[0].image), pixels(row["image"]))
    assert len(prepare([folder], tmp_path / "out")) == 5


def test_csv_column_mapping_and_embed_of_a_table(tmp_path, image_dir, trained):
    """`--columns` renames a CSV's columns; `unimm embed` on a Parquet table whose images are
    bytes keeps rows that open the same image again (the server and chat read them back)."""
    from unimm.commands.embed import run as embed
    from unimm.config import EmbedConfig
    from unimm.inference.documents import load_document
    from unimm.inference.store import load_index

    (tmp_path / "c.csv").write_text(
        "path,words,key\n" + "".join(f"imgs/{i}.jpg,colour {i},x{i}\n" for i in range(3))
    )
    decoded = [
        s
        for _, s in iter_decoded_records(
            tmp_path / "c.csv", columns=parse_columns("image=path,text=words,id=key")
        )
    ]
    assert [(s.id, s.slices[1].text) for s in decoded] == [(f"x{i}", f"colour {i}") for i in range(3)]
    with pytest.raises(
        UnimmError, match=r"--columns text=caption: no such column \(found: path, words, key\)"
    ):
        list(iter_decoded_records(tmp_path / "c.csv", columns=parse_columns("text=caption")))

    images = pictures(4)
    pq.write_table(
        pa.table({"image": [jpeg(im) for im in images], "caption": ["a", "b", "c", "d"]}),
        tmp_path / "e.parquet",
    )
    options = {
        "embed.model": str(trained[0]),
        "embed.data": [str(tmp_path / "e.parquet")],
        "embed.out": str(tmp_path / "i"),
    }
    embed(build_config(EmbedConfig, options=options), progress=False)
    _, rows, _ = load_index(tmp_path / "i")
    assert len(rows) == 4
    document = load_document(rows[2], [])
    np.testing.assert_array_equal(
        pixels(document.slices[0].image), pixels(Image.open(io.BytesIO(jpeg(images[2]))))
    )


def test_bad_tables_and_their_messages(tmp_path, image_dir):
    with pytest.raises(
        UnimmError, match="--columns picture=x: give ROLE=COLUMN pairs with roles image, text, id"
    ):
        parse_columns("picture=x")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a"]}),
            "test": datasets.Dataset.from_dict({"text": ["b"]}),
        }
    ).save_to_disk(tmp_path / "dd")
    with pytest.raises(
        UnimmError, match=r"a DatasetDict folder \(splits: train, test\); give one split's folder"
    ):
        prepare([tmp_path / "dd"], tmp_path / "o1")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UnimmError, match=r"input\(s\) not found: .*plain \(give record files, or folders"):
        prepare([tmp_path / "plain"], tmp_path / "o2")
    pq.write_table(
        pa.table({"image": [b"", b"x"], "caption": ["empty", "not an image"]}), tmp_path / "bad.parquet"
    )
    with pytest.raises(UnimmError) as info:
        prepare([tmp_path / "bad.parquet"], tmp_path / "o3")
    assert "bad.parquet:1: record 'bad-1': empty image (column 'image')" in str(info.value)


def test_repeated_errors_are_grouped_with_their_fix(tmp_path, image_dir):
    """Thirty captions whose images live elsewhere: one line with the count and the places,
    and the hint to pass --image-root; with it, the same file prepares."""
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "captions.csv"
    csv.write_text("image,caption\n" + "".join(f"{i % 6}.jpg,colour {i}\n" for i in range(30)))
    with pytest.raises(UnimmError) as info:
        prepare([csv], tmp_path / "out")
    message = str(info.value)
    assert "30 bad record(s)" in message and "30 × image '…' not found (looked for …)" in message
    assert "captions.csv:2, captions.csv:3" in message and "… 22 more" in message
    hint = "Hint: the images are not where the records say: if they live in another folder, pass"
    assert f"{hint} --image-root DIR" in message
    assert message.count("not found") == 2  # the kind and its one example, not thirty lines
    assert len(prepare([csv], tmp_path / "out", image_root=str(image_dir))) == 30


def test_prepare_without_teachers_warns_up_front(tmp_path, unimm_records):
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", str(unimm_records), "--out", str(tmp_path / "a"), "-q"])
    assert result.exit_code == 0, result.output
    assert "warning: no teachers given" in result.output and "--set train.alpha=0" in result.output
    recipe = tmp_path / "gen-only.yaml"
    recipe.write_text("train:\n  alpha: 0\n")
    quiet = runner.invoke(
        app, ["prepare", str(unimm_records), "--out", str(tmp_path / "b"), "-q", "--recipe", str(recipe)]
    )
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["counts"]["samples"] == 12


def test_table_inputs_cannot_reach_outside_their_root(tmp_path, image_dir):
    """An imagefolder's `../` file name and an absolute path are refused like any record's; a
    record file's string that looks like a table locator is only a (missing) path; a state.json
    naming a file elsewhere is refused; a column named with '#' and a spreadsheet's BOM work."""
    make_image(tmp_path / "secret.png", fmt="PNG")
    folder = tmp_path / "photos"
    make_image(folder / "ok.png", fmt="PNG")
    write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "ok.png", "text": "fine"},
            {"file_name": "../secret.png", "text": "escape"},
            {"file_name": str(tmp_path / "secret.png"), "text": "absolute"},
        ],
    )
    with pytest.raises(UnimmError) as info:
        prepare([folder], tmp_path / "o1")
    assert "2 bad record(s)" in str(info.value) and "outside the image root" in str(info.value)
    spoof = write_jsonl(
        tmp_path / "s.jsonl", [{"id": "a", "slices": [{"image": "embedded:/etc/passwd#0#x"}]}]
    )
    with pytest.raises(UnimmError, match="not found"):
        prepare([spoof], tmp_path / "o2")

    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(tmp_path / "ds")
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    state["_data_files"] = [{"filename": "../elsewhere.arrow"}]
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    with pytest.raises(UnimmError, match=r"state.json: names the data file '\.\./elsewhere\.arrow'"):
        prepare([tmp_path / "ds"], tmp_path / "o3")

    images = pictures(3)
    pq.write_table(
        pa.table({"img#1": [jpeg(im) for im in images], "t": ["a", "b", "c"]}), tmp_path / "h.parquet"
    )
    decoded = [
        s
        for _, s in iter_decoded_records(tmp_path / "h.parquet", columns=parse_columns("image=img#1,text=t"))
    ]
    np.testing.assert_array_equal(
        pixels(decoded[2].slices[0].image), pixels(Image.open(io.BytesIO(jpeg(images[2]))))
    )
    bom = tmp_path / "bom"
    make_image(bom / "0.png", fmt="PNG")
    (bom / "metadata.csv").write_bytes("\ufefffile_name,text\n0.png,zero\n".encode())
    assert [s.slices[1].text for _, s in iter_decoded_records(bom)] == ["zero"]


def test_a_changed_table_is_reported_not_misread(tmp_path):
    from unimm.data.adapters import iter_records
    from unimm.data.images import ImageProblem, read_image_source

    pq.write_table(
        pa.table({"image": [jpeg(im) for im in pictures(2)], "caption": ["a", "b"]}), tmp_path / "t.parquet"
    )
    (first, _) = list(iter_records(tmp_path / "t.parquet"))
    pq.write_table(
        pa.table({"image": [jpeg(im) for im in pictures(2, seed=5)], "caption": ["a", "b"]}),
        tmp_path / "t.parquet",
    )
    with pytest.raises(ImageProblem, match="the table changed since it was read"):
        read_image_source(first.slices[0].value)


def test_csv_mapping_wins_over_a_column_named_like_the_role(tmp_path, image_dir):
    (tmp_path / "c.csv").write_text("path,image,caption\nimgs/1.jpg,imgs/0.jpg,one\n")
    (decoded,) = [s for _, s in iter_decoded_records(tmp_path / "c.csv", columns=parse_columns("image=path"))]
    np.testing.assert_array_equal(pixels(decoded.slices[0].image), pixels(Image.open(image_dir / "1.jpg")))
