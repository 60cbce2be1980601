"""Each distinct image of a batch encoded once (data.VLMCollator(encode_images_once=True), the
adapters' encode_images_once): on every family's tiny model the loss and the gradients of all
parameters equal the plain path's (every row encodes its own image), for batches with and without
repeated images; a wrong row -> image mapping gives another loss (so the equality can fail); and a
paper-protocol spatial batch (obj1_groups) runs the vision tower on exactly its distinct images."""
import pytest
import torch

import data
import lm_loss
import make_grid_data as mg
import models

FAMILIES = ["tiny", "tiny-qwen2.5", "tiny-llava", "tiny-mllama", "tiny-internvl", "tiny-gemma3"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def grid_samples(tmp_path_factory):
    """Paper-worded questions of 8 grid images, 28 px cells: most images get two questions (left/right
    and above/below)."""
    out = tmp_path_factory.mktemp("grid")
    objects = mg.builtin_objects(64)
    mg.make_grid_images(out, {n: objects[n] for n in ("red circle", "blue square")}, cell=28, sizes=(124,),
                        max_pairs=1, max_images=8, seed=0, progress=False)
    return data.GridDataset(out, "paper").samples


def _batches(samples):
    """(repeated, distinct): 6 questions on 3 images (each asked twice, rows interleaved so shared
    rows are not neighbours), and 4 questions on 4 different images."""
    by_image = {}
    for s in samples:
        by_image.setdefault(s["image_path"], []).append(s)
    twice = [qs for qs in by_image.values() if len(qs) == 2][:3]
    assert len(twice) == 3, "the fixture should have images with two questions"
    repeated = [qs[0] for qs in twice] + [qs[1] for qs in reversed(twice)]
    distinct = [qs[0] for qs in list(by_image.values())[:4]]
    return repeated, distinct


def _loss_and_grads(model, adapter, batch):
    model.zero_grad(set_to_none=True)
    inputs, _, _ = data.split_batch(batch, "cpu")
    loss = lm_loss.supervised_lm_loss(model, adapter, inputs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_once_per_image_equals_the_plain_path(family, grid_samples):
    model, processor, adapter = models.load_model_and_processor(family)
    model.train()
    for p in model.parameters():  # every tensor, vision tower included, so every gradient is compared
        p.requires_grad_(True)
    plain_collate = data.VLMCollator(processor, adapter)
    once_collate = data.VLMCollator(processor, adapter, encode_images_once=True)
    tower = {id(p) for p in adapter.vision_tower(model).parameters()}
    vision = {n for n, p in model.named_parameters() if id(p) in tower}
    for samples, n_images in zip(_batches(grid_samples), (3, 4)):
        plain_batch, once_batch = plain_collate(samples), once_collate(samples)
        assert once_batch["image_index"].unique().numel() == n_images
        assert "image_index" not in plain_batch
        for key in adapter.pixel_keys:  # the pixel inputs hold each image once
            assert once_batch[key].shape[0] * len(samples) == plain_batch[key].shape[0] * n_images
        plain_loss, plain_grads = _loss_and_grads(model, adapter, plain_batch)
        once_loss, once_grads = _loss_and_grads(model, adapter, once_batch)
        assert torch.isfinite(plain_loss)
        assert abs(once_loss.item() - plain_loss.item()) <= TOLERANCE
        assert once_grads.keys() == plain_grads.keys()
        assert vision & plain_grads.keys(), "the vision tower should get gradients"
        for name, grad in plain_grads.items():
            torch.testing.assert_close(once_grads[name], grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)

    # The check can fail: the last row (its image's second question) handed another image's
    # features, the rest unchanged, moves the vision gradients far beyond the tolerance. (A random
    # tiny model's loss hardly depends on the image, 2e-5 here, so the gradients are the witness;
    # swapping two images' pixels would not do either: rows with the same wording and answer only
    # trade places in the mean.)
    samples = _batches(grid_samples)[0]
    wrong = once_collate(samples)
    assert wrong["image_index"][-1] == 0
    wrong["image_index"][-1] = 1
    _, plain_grads = _loss_and_grads(model, adapter, plain_collate(samples))
    _, wrong_grads = _loss_and_grads(model, adapter, wrong)
    worst = max(float(((wrong_grads[n] - g).abs() / (g.abs() + TOLERANCE)).max()) for n, g in plain_grads.items()
                if n in vision)
    assert worst > 100 * TOLERANCE


@pytest.mark.fast
def test_first_rows_of_checks_the_numbering():
    assert models.first_rows_of(torch.tensor([0, 1, 0, 2, 1])) == [0, 1, 3]
    with pytest.raises(ValueError, match="order of first appearance"):
        models.first_rows_of(torch.tensor([1, 0]))


def test_paper_spatial_batch_encodes_each_distinct_image_once(tmp_path):
    """A batch of the paper's spatial arm (obj1_groups: obj1, its cell and obj2 fixed, both question
    types and all sizes mixed) through the tiny Qwen2-VL: the vision tower sees exactly the batch's
    distinct images, and fewer than its questions."""
    objects = mg.builtin_objects(64)
    mg.make_grid_images(tmp_path, {n: objects[n] for n in ("red circle", "blue square")}, cell=28,
                        sizes=(74, 124), max_pairs=1, seed=0, progress=False)
    grid = data.GridDataset(tmp_path, "paper")
    sampler = data.make_batch_sampler("obj1_groups", grid.samples, range(len(grid.samples)), 15, seed=0)
    samples = [grid.samples[i] for i in next(iter(sampler))]
    distinct = len({s["image_path"] for s in samples})
    assert len(samples) == 15 and distinct < len(samples)

    model, processor, adapter = models.load_model_and_processor("tiny")
    encoded = []
    # Qwen2-VL's tower takes all images' patches at once; grid_thw has one row per image.
    hook = adapter.vision_tower(model).register_forward_pre_hook(
        lambda module, args, kwargs: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)
    try:
        for once in (False, True):
            batch = data.VLMCollator(processor, adapter, encode_images_once=once)(samples)
            with torch.no_grad():
                lm_loss.supervised_lm_loss(model, adapter, data.split_batch(batch, "cpu")[0])
    finally:
        hook.remove()
    assert encoded == [len(samples), distinct]
