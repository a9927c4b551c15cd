"""Classification extras of the PyTorch TensorBoard tutorial: PR curves and the embedding projector."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from trainer.batch import last_output, split_batch
from trainer.callbacks.tags import pr_curve_tags
from trainer.callbacks.tensorboard import TensorBoardWriterCallback, denormalize
from trainer.distributed import gather_to_rank_zero, is_rank_zero


class PRCurveCallback(TensorBoardWriterCallback):
    """At the end of `fit`, one precision-recall curve per class (`add_pr_curve`) over a loader.

    Under torchrun every rank predicts its shard of the validation loader and rank 0 writes the
    curves over all of them.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        classes: class names; each names its curve, ``<tag_prefix><index> <name>`` (``pr/0
            T-shirt/top``), so that TensorBoard lists the curves in class order.
        loader: ``(inputs, labels)`` batches; default: the validation loader of `fit`.
        tag_prefix: the start of every curve's tag.
    """

    rank_zero_only = False  # every rank predicts its own shard; only rank 0 has a writer

    def __init__(
        self, log_dir: str | os.PathLike, classes: Sequence[str], loader: Any = None, tag_prefix: str = "pr/"
    ) -> None:
        super().__init__(log_dir)
        self.classes, self.loader, self.tag_prefix = list(classes), loader, tag_prefix
        self._failed = False

    def on_exception(self, trainer, exception) -> None:
        self._failed = True

    def on_fit_end(self, trainer) -> None:
        sharded = self.loader is None
        loader = trainer.val_loader if sharded else self.loader
        if loader is None or self._failed or not trainer.history or not (sharded or is_rank_zero()):
            return
        local = self.predict(trainer, loader)
        gathered = gather_to_rank_zero(local) if sharded else [local]
        writer = self.writer
        if writer is None or gathered is None:  # ranks other than 0 only contributed their shard
            return
        parts = [part for part in gathered if len(part[0])]  # ranks whose shard was empty
        probabilities = torch.cat([p for p, _ in parts])
        labels = torch.cat([t for _, t in parts])
        for index, tag in enumerate(pr_curve_tags(self.classes, self.tag_prefix)):
            writer.add_pr_curve(tag, labels == index, probabilities[:, index], global_step=trainer.global_step)

    @staticmethod
    def predict(trainer, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities and labels of every sample of `loader`, on the CPU."""
        probabilities, labels = [], []
        for batch in loader:
            inputs, targets = split_batch(batch)
            probabilities.append(last_output(trainer.predict(inputs)).float().softmax(dim=1).cpu())
            labels.append(targets.cpu())
        if not probabilities:  # a rank whose shard holds no sample
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat(probabilities), torch.cat(labels)


class EmbeddingCallback(TensorBoardWriterCallback):
    """At fit start, a sample of images in TensorBoard's embedding projector (`add_embedding`):
    each image's pixels as its feature vector, its class name as its label, the image itself
    as the thumbnail, as in the PyTorch TensorBoard tutorial.

    Args:
        log_dir: the run directory (shared with the run's other TensorBoard callbacks).
        images: (N, C, H, W) or (N, H, W) images (uint8, or float normalised by `mean`/`std`).
        labels: (N,) class indices.
        classes: class names.
        num_samples: how many samples, drawn at random with `seed`.
        mean, std: the normalisation of float images, undone for the thumbnails.
        seed: seeds the draw of the samples.
        tag: the embedding's name in the projector.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        num_samples: int = 100,
        mean: Any = None,
        std: Any = None,
        seed: int = 0,
        tag: str = "images",
    ) -> None:
        super().__init__(log_dir)
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(images), generator=generator)[:num_samples]
        chosen = images[pick]
        if chosen.dtype == torch.uint8:
            chosen = chosen.float() / 255.0
        if chosen.dim() == 3:
            chosen = chosen.unsqueeze(1)
        self.thumbnails = denormalize(chosen, mean, std)
        self.labels = [list(classes)[int(i)] for i in labels[pick]]
        self.tag = tag

    def on_fit_start(self, trainer) -> None:
        if not self.resumed:
            features = self.thumbnails.flatten(1)
            self._rank_zero_writer().add_embedding(
                features, metadata=self.labels, label_img=self.thumbnails, global_step=trainer.global_step, tag=self.tag
            )
