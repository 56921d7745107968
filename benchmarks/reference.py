"""Reference paths that only the benchmarks and the tests run: ``--gpu_decode``'s views made one image at a time."""
import torch

from data.gpu_views import decode_batch_on


def decode_views_on(device, encoded, views, name_of, seed_of):
    """Decode a batch on ``device`` (``decode_batch_on``) and make each image's views there one at a time, the j-th
    from torch's random stream seeded with ``seed_of(j)``, as the loader's workers would on the CPU; returns what
    the loader would have (a batch, or two)."""
    images = decode_batch_on(device, encoded, name_of)
    per_image = []
    for j, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(j))
            per_image.append(views(image))
    if isinstance(per_image[0], torch.Tensor):
        return torch.stack(per_image)
    return tuple(torch.stack(view) for view in zip(*per_image))
