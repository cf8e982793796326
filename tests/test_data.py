"""Claims about the AnchorDataModule: the streams it builds and the input it refuses."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anchor_clip.data import AnchorDataModule, EvalSet
from anchor_clip.data.images import load_image
from tests.conftest import CLASSES, make_datamodule


def test_train_batches_carry_every_stream_with_its_own_batch_size(tiny_data):
    dm = make_datamodule(tiny_data)
    batch, _, _ = next(iter(dm.train_dataloader()))
    finetune, retrieved = batch["finetune"], batch["retrieved"]
    assert finetune["images"].shape == (8, 3, 32, 32)
    assert finetune["labels"].shape == (8,)
    assert finetune["texts"].shape == finetune["captions"].shape == (8, 16)
    assert retrieved["images"].shape == (6, 3, 32, 32) and retrieved["texts"].shape == (6, 16)
    # prompts and captions are different texts of the same images
    assert not torch.equal(finetune["texts"], finetune["captions"])


def test_finetune_texts_are_the_class_prompt_of_each_label(tiny_data):
    dm = make_datamodule(tiny_data, captions=None, retrieved=None)
    item = dm.streams["finetune"][5]
    assert item["texts"] == f"a photo of a {CLASSES[int(item['labels'])]}."
    assert "captions" not in item


def test_eval_specs_keep_each_sets_own_classnames_and_templates(tiny_data):
    dm = make_datamodule(tiny_data)
    specs = {s.name: s for s in dm.eval_specs}
    assert specs["id"].classnames == CLASSES and specs["id"].templates == ["a photo of a {c}."]
    assert specs["zs"].classnames == CLASSES[2:] and specs["zs"].templates == ["a {c}."]
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [16, 8]


def test_caption_file_for_other_images_is_rejected_naming_the_missing_ids(tiny_data, tmp_path):
    captions = pd.read_json(tiny_data["captions"], lines=True).iloc[3:]
    path = tmp_path / "captions.csv"
    captions.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no caption for 3 of 32 .*ft0"):
        make_datamodule(tiny_data, captions=str(path))


def test_manifest_without_required_column_names_file_and_columns(tiny_data, tmp_path):
    path = tmp_path / "bad.csv"
    pd.read_csv(tiny_data["finetune"]).to_csv(path, index=False, sep="\t")
    with pytest.raises(ValueError, match=r"data.finetune: .*bad.csv has no column"):
        make_datamodule(tiny_data, finetune=str(path))


def test_labels_beyond_the_class_names_are_rejected(tiny_data):
    with pytest.raises(ValueError, match="labels must index the 2 class names"):
        make_datamodule(tiny_data, classnames=CLASSES[:2])


def test_retrieved_manifest_smaller_than_a_batch_is_rejected(tiny_data):
    with pytest.raises(ValueError, match="fewer than the minimum 64"):
        make_datamodule(tiny_data, retrieved_batch_size=64)


def test_no_training_stream_is_an_error():
    with pytest.raises(ValueError, match="no training stream"):
        AnchorDataModule()


def test_eval_sets_given_as_mappings_are_kept_as_plain_dicts_for_the_checkpoint(tiny_data):
    as_dict = {"name": "id", "manifest": tiny_data["eval_id"], "classnames": CLASSES, "templates": None}
    data = make_datamodule(tiny_data, eval_sets=[as_dict, EvalSet("id2", as_dict["manifest"], CLASSES)])
    assert data.eval_sets == [EvalSet(**as_dict), EvalSet("id2", as_dict["manifest"], CLASSES)]
    assert data.hparams["eval_sets"] == [as_dict, {**as_dict, "name": "id2"}]
    with pytest.raises(ValueError, match=r"data.eval_sets\[1\] must be an EvalSet or a mapping with name, manifest"):
        make_datamodule(tiny_data, eval_sets=[as_dict, {"name": "id2", "labels": "x.csv"}])


def test_templates_without_class_placeholder_are_rejected(tiny_data):
    with pytest.raises(ValueError, match=r"data.templates must be .*'\{c\}'"):
        make_datamodule(tiny_data, templates=["a photo of a {}."])


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA"])
def test_load_image_gives_the_files_pixels_as_rgb_with_the_file_closed(tmp_path, mode: str):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    source = Image.fromarray(pixels).convert(mode)
    path = tmp_path / "image.png"
    source.save(path)
    image = load_image(str(path))
    path.unlink()  # the pixels are in memory: nothing reads the file after load_image returns
    assert image.mode == "RGB" and image.size == (5, 6)
    assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB")))


def test_decoded_streams_give_the_same_batches_without_reading_files(tiny_data, monkeypatch):
    from anchor_clip.data import images

    batches = {}
    for mb in (0, 64):
        dm = make_datamodule(tiny_data, decoded_cache_mb=mb)
        if mb:  # decoded in setup: the training streams no longer touch the files
            monkeypatch.setattr(images, "read_image", lambda path: pytest.fail(f"read {path} from disk"))
        torch.manual_seed(0)
        batches[mb], _, _ = next(iter(dm.train_dataloader()))
    for stream in ("finetune", "retrieved"):
        from_files, decoded = batches[0][stream], batches[64][stream]
        assert from_files.keys() == decoded.keys()
        for key in ("images", "texts"):  # the augmented images and the tokenized prompts or captions
            assert torch.equal(from_files[key], decoded[key]), (stream, key)


def test_eval_sets_are_decoded_when_first_loaded_and_give_the_same_batches(tiny_data, monkeypatch):
    from anchor_clip.data import images

    from_files = [next(iter(loader)) for loader in make_datamodule(tiny_data).val_dataloader()]
    dm = make_datamodule(tiny_data, decoded_cache_mb=64)
    assert all(d._decoded is None for d in dm.evals)  # not in setup: a run that never validates skips it
    first = [next(iter(loader)) for loader in dm.val_dataloader()]
    monkeypatch.setattr(images, "read_image", lambda path: pytest.fail(f"read {path} from disk"))
    again = [next(iter(loader)) for loader in dm.val_dataloader()]  # a second evaluation reads no file
    for files, *decoded in zip(from_files, first, again, strict=True):
        for batch in decoded:
            assert torch.equal(files["images"], batch["images"]) and torch.equal(files["labels"], batch["labels"])


def test_decoding_falls_back_to_the_files_with_a_warning(tiny_data, tmp_path):
    from anchor_clip.data.images import DecodedImages

    with pytest.warns(UserWarning, match=r"data.retrieved: its 40 images need .* MB decoded, more than "
                                         r"data.decoded_cache_mb=0.01"):
        dm = make_datamodule(tiny_data, decoded_cache_mb=0.01)
    assert dm.streams["retrieved"].image(0).size == (32, 32)  # still readable, from its file
    sizes = []
    for i, size in enumerate((32, 48)):
        sizes.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (size, size)).save(sizes[-1])
    with pytest.warns(UserWarning, match=r"1.png is 48x48 px but the stream's first image is 32x32"):
        assert DecodedImages.decode(sizes, max_mb=64, what="data.finetune") is None
    with pytest.raises(ValueError, match="data.decoded_cache_mb must be >= 0"):
        make_datamodule(tiny_data, decoded_cache_mb=-1)
