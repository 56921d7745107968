"""Multi-view cache replay: ``cache_teacher_feats.py --cache_views K`` caches the teacher on view k of image i, drawn
from (--seed, i, k), with its box and flip (``ShardWeakViews``); training replays one stored view per sample and step
(``ReplayedViews``) and regresses that view's row."""
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from data.sampler import derive_seed, seeded
from data.teacher_cache import teacher_input_of
from data.transforms import WEAK_SCALE
from utils.errors import SimRegError

VIEW_COLUMNS = ('top', 'left', 'height', 'width', 'flip')


def view_spec(size, seed):
    """The sidecar's description of the views of a multi-view cache."""
    return {'crop': f'RandomResizedCrop({size}, scale={WEAK_SCALE})', 'flip': 'horizontal, p=0.5', 'seed': seed,
            'columns': list(VIEW_COLUMNS)}


def draw_weak_view(image, size, seed):
    """(top, left, height, width, flip) of the weak view that ``weak_transform(size)`` draws after
    ``torch.manual_seed(seed)``: ``replay_weak_view`` of it gives the same pixels."""
    with seeded(seed):
        box = v2.RandomResizedCrop(size, scale=WEAK_SCALE).make_params([image])
        flip = torch.rand(1).item() < 0.5  # RandomHorizontalFlip's draw (p = 0.5)
    return box['top'], box['left'], box['height'], box['width'], int(flip)


def replay_weak_view(image, view, size):
    """The weak view (top, left, height, width, flip) of a uint8 image, resized to ``size``."""
    top, left, height, width, flip = (int(v) for v in view)
    crop = v2.functional.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    return v2.functional.horizontal_flip(crop) if flip else crop


class ShardWeakViews(Dataset):
    """The K weak views of each image of rows [start, stop) of a dataset of uint8 images: position p is view
    p % K of image start + p // K, as (p, the view, its box and flip); an image is decoded once for its K."""

    def __init__(self, dataset, rows, num_views, size, seed):
        self.dataset, (self.start, self.stop) = dataset, rows
        self.num_views, self.size, self.seed = num_views, size, seed
        self.decoded = (None, None)

    def __len__(self):
        return (self.stop - self.start) * self.num_views

    def __getitem__(self, position):
        index, k = self.start + position // self.num_views, position % self.num_views
        if self.decoded[0] != index:
            self.decoded = (index, self.dataset[index][1])
        image = self.decoded[1]
        view = draw_weak_view(image, self.size, derive_seed(self.seed, index, k))
        return position, replay_weak_view(image, view, self.size), torch.tensor(view)


class ReplayedViews(Dataset):
    """Training samples of a multi-view cache: ``((index, view), the replayed view, label)`` for one of the
    sample's K stored views, picked by torch's RNG (seeded per sample by ``data.sampler.SeededSamples``)."""

    def __init__(self, dataset, boxes, size):
        self.dataset, self.boxes, self.size = dataset, boxes, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        path, label = self.dataset.samples[index]
        view = int(torch.randint(self.boxes.shape[1], ()))
        image = replay_weak_view(self.dataset.loader(path), self.boxes[index, view], self.size)
        return torch.tensor([index, view]), image, label


def student_dataset(dataset, teachers, args, log):
    """The student's training set (``ReplayedViews``) when the teachers are multi-view caches, else None; the student
    sees one view per step, so every teacher must be a cache of the same weak views."""
    with_views = {name: t.cache for name, t in teachers.items() if t.boxes is not None}
    if not with_views:
        return None
    cache = next(iter(with_views.values()))
    if len(with_views) < len(teachers):
        others = ', '.join(name for name in teachers if name not in with_views)
        raise SimRegError(f'{cache.path} holds {cache.num_views} views per image that the student replays, but '
                          f'teacher(s) {others} cannot target them: give every teacher a cache built with the same '
                          f'--cache_views, --seed and --image_size, or use single-view caches')
    if len({c.meta['views_sha256'] for c in with_views.values()}) > 1:
        raise SimRegError(f'the multi-view caches {", ".join(c.path for c in with_views.values())} hold different '
                          f'views: build them with the same --cache_views, --seed and --image_size')
    if args.gpu_decode or args.weak_strong or not args.weak_weak:
        raise SimRegError(f'{cache.path} holds weak views that the student replays as they are: train with '
                          f'--weak_weak (without --weak_strong{", --gpu_decode" if args.gpu_decode else ""})')
    log.info('==> the student replays the teacher\'s views: one of the %d cached per image, each step',
             cache.boxes.shape[1])
    # cut at the size the teachers' views were cut at, the larger of the nets' (the device resizes the student's)
    size = max([args.image_size] + [teacher_input_of(c.meta).size for c in with_views.values()])
    return ReplayedViews(dataset, cache.boxes, size)
