"""ImageNet-style data for the ``vtp`` command: ImageFolder trees through timm's transforms.

Loaders are rebuilt every epoch from an explicit (seed, epoch) so that a resumed run can skip
the batches it already consumed and see the same samples in the same order, and so that
building an iterator never touches the global random state.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from timm.data import Mixup, create_dataset, create_transform
from timm.data.distributed_sampler import RepeatAugSampler

from .errors import VTPError

__all__ = [
    "DataSpec", "SyntheticImages", "build_datasets", "train_loader", "eval_loader",
    "build_mixup", "steps_per_epoch", "check_data_args", "image_folder", "train_transform",
    "eval_transform", "with_transform", "train_steps", "mixup_from", "train_transform_from",
    "eval_transform_from",
]


@dataclass
class DataSpec:
    """What the model needs to know about the data."""
    num_classes: int
    train_size: int
    val_size: int
    class_to_idx: Optional[Dict[str, int]] = None


class SyntheticImages(Dataset):
    """Random normalised images with cyclic labels; sample i is the same in every epoch and
    every process, and costs no disk or decoding."""

    def __init__(self, size: int, num_classes: int, img_size: Tuple[int, int], seed: int = 0):
        self.size = size
        self.num_classes = num_classes
        self.img_size = tuple(img_size)
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(3, *self.img_size, generator=g), index % self.num_classes


def check_data_args(data: Optional[str], synthetic: bool, splits: Sequence[str]) -> None:
    """Fails before any work when the folders are not there."""
    if synthetic:
        return
    if not data:
        raise VTPError("no data: pass --data DIR (an ImageFolder root) or --synthetic")
    if not os.path.isdir(data):
        raise VTPError(f"data folder not found: {data}")
    for split in splits:
        path = os.path.join(data, split)
        if not os.path.isdir(path):
            raise VTPError(f"data folder {data} has no '{split}' sub-folder ({path})")


def image_folder(root: str, split: str, class_map: Optional[Dict[str, int]] = None,
                 map_source: str = "the training split"):
    """The ImageFolder dataset of root/split. With `class_map`, targets follow that map and a
    class folder missing from it is an error (timm would silently drop its images)."""
    path = os.path.join(root, split)

    def read(mapping):
        try:
            # search_split=False: `path` is the split folder itself, never a guess of timm's.
            return create_dataset("", root=path, split=split, search_split=False,
                                  class_map=mapping or "")
        except Exception as e:  # timm raises RuntimeError/AssertionError on empty folders
            raise VTPError(f"cannot read images from {path}: {e}") from None

    ds = read(None)
    if len(ds) == 0:
        raise VTPError(f"no images found under {path}")
    if class_map is not None and ds.reader.class_to_idx != class_map:
        unknown = sorted(set(ds.reader.class_to_idx) - set(class_map))
        if unknown:
            more = " ..." if len(unknown) > 5 else ""
            raise VTPError(f"{path}: class folders {', '.join(unknown[:5])}{more} are not among "
                           f"the {len(class_map)} classes of {map_source}")
        ds = read(dict(class_map))
    return ds


def build_datasets(
        data: Optional[str],
        synthetic: bool,
        img_size: Tuple[int, int],
        train_split: Optional[str] = "train",
        val_split: Optional[str] = "val",
        num_classes: Optional[int] = None,
        synthetic_size: int = 0,
        synthetic_val_size: int = 0,
        class_map: Optional[Dict[str, int]] = None,
) -> Tuple[Optional[Dataset], Optional[Dataset], DataSpec]:
    """Train and validation datasets (without transforms) and the class count. Class indices
    follow `class_map` (a trained model's) when given, else the training split's folders;
    the validation split reuses them."""
    if synthetic:
        n_cls = num_classes or 1000
        train = SyntheticImages(synthetic_size, n_cls, img_size, seed=0) if train_split else None
        val = SyntheticImages(synthetic_val_size, n_cls, img_size, seed=1) if synthetic_val_size else None
        return train, val, DataSpec(n_cls, len(train) if train else 0, len(val) if val else 0)
    map_source = "the model" if class_map is not None else "the training split"
    train = image_folder(data, train_split, class_map, map_source) if train_split else None
    if class_map is None and train is not None:
        class_map = dict(train.reader.class_to_idx)
    val = image_folder(data, val_split, class_map, map_source) if val_split else None
    if class_map is None:
        class_map = dict(val.reader.class_to_idx)
    found = max(class_map.values()) + 1
    n_cls = num_classes or found
    if n_cls < found:
        raise VTPError(f"--num-classes {n_cls} is smaller than the {found} classes of {data}")
    return train, val, DataSpec(n_cls, len(train) if train else 0, len(val) if val else 0,
                                dict(class_map))


def train_transform(img_size, *, no_aug: bool, aa: Optional[str], color_jitter: float,
                    reprob: float, remode: str, recount: int, interpolation: str, mean, std):
    aa = None if (aa in (None, "", "none") or no_aug) else aa
    return create_transform(
        img_size, is_training=True, no_aug=no_aug, auto_augment=aa, color_jitter=color_jitter,
        re_prob=0.0 if no_aug else reprob, re_mode=remode, re_count=recount,
        interpolation=interpolation, mean=mean, std=std)


def eval_transform(img_size, *, crop_pct: float, interpolation: str, mean, std):
    return create_transform(img_size, is_training=False, crop_pct=crop_pct,
                            interpolation=interpolation, mean=mean, std=std)


class _Transformed(Dataset):
    """Applies a transform on top of a dataset without mutating it (train and val may share
    one underlying folder reader)."""

    def __init__(self, base: Dataset, transform):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        img, target = self.base[index]
        if self.transform is not None and not isinstance(img, torch.Tensor):
            img = self.transform(img)
        return img, target


def with_transform(ds: Dataset, transform) -> Dataset:
    return _Transformed(ds, transform)


class _Skip(Sampler):
    """The wrapped sampler's order with the first `skip` indices removed."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class _Shard(Sampler):
    """Indices rank, rank + world, ... without padding: evaluation sees every image once."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(ds: Dataset, *, rank: int, world_size: int, seed: int, epoch: int,
                  aug_repeats: int) -> Sampler:
    """Per-process shuffled shard; the same permutation for a given (seed, epoch) whatever the
    world size, with process r taking positions r, r + world, ... of it."""
    if aug_repeats > 0:
        sampler = RepeatAugSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                   num_repeats=aug_repeats)
        # RepeatAugSampler seeds its shuffle with the epoch alone; fold our seed in.
        sampler.set_epoch(seed * 100_003 + epoch)
    else:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    return sampler


def steps_per_epoch(sampler_len: int, batch_size: int, accum_steps: int) -> int:
    return (sampler_len // batch_size) // accum_steps


def _generator(seed: int, rank: int, epoch: int, salt: int) -> torch.Generator:
    # Seeds the loader's worker processes; independent of the global RNG so that
    # creating a loader never shifts the training random stream.
    return torch.Generator().manual_seed(((seed * 1009 + rank) * 100_003 + epoch) * 7 + salt)


def train_loader(ds: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 epoch: int, skip_batches: int, aug_repeats: int, workers: int,
                 pin_memory: bool) -> DataLoader:
    """The loader of one epoch, starting after `skip_batches` already consumed batches."""
    sampler = train_sampler(ds, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                            aug_repeats=aug_repeats)
    if skip_batches:
        sampler = _Skip(sampler, skip_batches * batch_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=True,
                      generator=_generator(seed, rank, epoch, 0),
                      persistent_workers=False)


def train_steps(ds: Dataset, *, batch_size: int, accum_steps: int, rank: int, world_size: int,
                seed: int, aug_repeats: int) -> int:
    sampler = train_sampler(ds, rank=rank, world_size=world_size, seed=seed, epoch=0,
                            aug_repeats=aug_repeats)
    return steps_per_epoch(len(sampler), batch_size, accum_steps)


def eval_loader(ds: Dataset, *, batch_size: int, rank: int, world_size: int, workers: int,
                pin_memory: bool) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=_Shard(len(ds), rank, world_size),
                      num_workers=workers, pin_memory=pin_memory, drop_last=False,
                      generator=_generator(0, rank, 0, 1))


def build_mixup(*, no_aug: bool, mixup: float, cutmix: float, prob: float, switch_prob: float,
                mode: str, smoothing: float, num_classes: int) -> Optional[Mixup]:
    if no_aug or prob <= 0 or (mixup <= 0 and cutmix <= 0):
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
                 mode=mode, label_smoothing=smoothing, num_classes=num_classes)


# The same, from a stage's DataSettings (settings.py), read field by field.

def mixup_from(d, num_classes: int) -> Optional[Mixup]:
    return build_mixup(no_aug=d.no_aug, mixup=d.mixup, cutmix=d.cutmix, prob=d.mixup_prob,
                       switch_prob=d.mixup_switch_prob, mode=d.mixup_mode, smoothing=d.smoothing,
                       num_classes=num_classes)


def train_transform_from(d, img_size, norm: Dict[str, Sequence[float]]):
    return train_transform(img_size, no_aug=d.no_aug, aa=d.aa, color_jitter=d.color_jitter,
                           reprob=d.reprob, remode=d.remode, recount=d.recount,
                           interpolation=d.interpolation, mean=norm["mean"], std=norm["std"])


def eval_transform_from(d, img_size, norm: Dict[str, Sequence[float]]):
    return eval_transform(img_size, crop_pct=d.crop_pct, interpolation=d.interpolation,
                          mean=norm["mean"], std=norm["std"])
