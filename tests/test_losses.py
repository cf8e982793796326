"""Claims about the contrastive loss and the ARF objective."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from anchor_clip.losses import ARFLoss, contrastive_loss


def _features(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return image, text


def test_contrastive_loss_matches_hand_computed_2x2_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # image->text rows: [2, 1.2], [0, 1.6]; text->image rows: [2, 0], [1.2, 1.6]
    i2t = -(math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) + math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    t2i = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert contrastive_loss(image, text, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_contrastive_loss_equals_open_clip_clip_loss():
    image, text = _features()
    scale = torch.tensor(14.3)
    assert torch.allclose(contrastive_loss(image, text, scale), ClipLoss()(image, text, scale), atol=1e-6)


def test_contrastive_loss_is_symmetric_in_image_and_text():
    image, text = _features(seed=3)
    scale = torch.tensor(10.0)
    assert torch.allclose(contrastive_loss(image, text, scale), contrastive_loss(text, image, scale))


def test_contrastive_loss_rejects_unpaired_features():
    image, text = _features()
    with pytest.raises(ValueError, match="pair row by row"):
        contrastive_loss(image, text[:-1], torch.tensor(1.0))


def test_arf_loss_equals_flyp_when_anchor_weights_are_zero():
    ft, cap, ret = _features(seed=1), _features(seed=2), _features(seed=3)
    scale = torch.tensor(20.0)
    pairs = {"finetune": ft, "caption": cap, "retrieved": ret}
    arf = ARFLoss({"finetune": 1.0, "caption": 0.0, "retrieved": 0.0})(pairs, scale)
    assert set(arf) == {"loss", "loss_finetune"}  # zero-weight streams are not even scored
    assert torch.equal(arf["loss"], contrastive_loss(*ft, scale))


def test_arf_loss_is_weighted_sum_of_its_terms():
    pairs = {"finetune": _features(seed=1), "caption": _features(seed=2), "retrieved": _features(seed=3)}
    scale = torch.tensor(20.0)
    out = ARFLoss({"finetune": 1.0, "caption": 0.5, "retrieved": 2.0})(pairs, scale)
    expected = out["loss_finetune"] + 0.5 * out["loss_caption"] + 2.0 * out["loss_retrieved"]
    assert torch.allclose(out["loss"], expected)
    assert torch.allclose(out["loss_caption"], contrastive_loss(*pairs["caption"], scale))


def test_arf_loss_rejects_unknown_stream_weight():
    with pytest.raises(ValueError, match="unknown loss streams"):
        ARFLoss({"finetune": 1.0, "captions": 1.0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoTower(torch.nn.Module):
    """Linear image and text encoders: enough to check gradients through the gathered loss."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)


def _model_and_batch():
    torch.manual_seed(0)
    return TwoTower(), torch.randn(8, 12), torch.randn(8, 10)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.distributed.nn.functional as dist_fn

    model, images, texts = _model_and_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages gradients over processes
    shard = slice(rank * 4, (rank + 1) * 4)
    loss = contrastive_loss(*ddp(images[shard], texts[shard]), torch.tensor(10.0),
                            gather=lambda x: torch.cat(dist_fn.all_gather(x)), rank=rank)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"loss": mean_loss / world, "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_local_loss_with_gathered_grads_matches_global_loss(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    model, images, texts = _model_and_batch()
    loss = contrastive_loss(*model(images, texts), torch.tensor(10.0))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
        for g, p in zip(got["grads"], model.parameters(), strict=True):
            assert torch.allclose(g, p.grad, atol=1e-6)
