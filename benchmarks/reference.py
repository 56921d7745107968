"""Reference paths that only the benchmarks and the tests run: ``--gpu_decode``'s views made one image at a time,
its list collate, per-sample seeding through ``torch.manual_seed``, and a teacher of given targets."""
import torch

from data.gpu_views import decode_batch_on
from data.sampler import SeededSamples, sample_seed, seeded


def decode_views_on(device, encoded, views, name_of, seed_of):
    """Decode a batch on ``device`` (``decode_batch_on``) and make each image's views there one at a time, the j-th
    from torch's random stream seeded with ``seed_of(j)``, as the loader's workers would on the CPU; returns what
    the loader would have (a batch, or two)."""
    images = decode_batch_on(device, encoded, name_of)
    per_image = []
    for j, image in enumerate(images):
        with seeded(seed_of(j)):
            per_image.append(views(image))
    if isinstance(per_image[0], torch.Tensor):
        return torch.stack(per_image)
    return tuple(torch.stack(view) for view in zip(*per_image))


def list_collate(batch):
    """Batch of (index, encoded sample, label) with the samples left a list: two tensors per image cross from a
    worker (``data.gpu_views.packed_collate`` packs them)."""
    indices, encoded, labels = zip(*batch)
    return torch.tensor(indices), list(encoded), torch.tensor(labels)


class ManualSeededSamples(SeededSamples):
    """``SeededSamples`` seeded by ``fork_rng`` + ``torch.manual_seed``, which seeds every back-end torch has."""

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class FixedTargets:
    """A teacher whose targets are given, for ``train_student.train_step`` on precomputed features."""

    needs_view = False

    def __init__(self, targets):
        self.targets = targets

    def __call__(self, index, view=None, amp_dtype=None):
        return self.targets


def fixed_step(model, images, targets, optimizer, ctx):
    """``train_student.train_step`` on ``images`` against ``targets`` ({head name: features})."""
    import train_student
    teachers = {name: FixedTargets(target) for name, target in targets.items()}
    return train_student.train_step(model, teachers, (torch.arange(len(images)), images, images), optimizer, ctx)
