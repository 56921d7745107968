"""Everything ``--gpu_decode``: the loader's workers read each file and draw its views' parameters
(``ViewParams``) and pack a batch into a few tensors (``packed_collate``); the device decodes the batch (nvjpeg)
and makes every view of it at once (``BatchedViews``).

- parameters: drawn with the view transforms' own random draws, in their order, from the sample's seed, so the
  crop boxes, flips, colour factors and blur sigmas are the CPU pipeline's, bit for bit (``draw_view_params``).
- crop + resize + flip: torchvision's antialiased bilinear resize is separable, so each image's crop, resize and
  flip is a pair of weight matrices (``resize_weights``: triangle weights, zero outside the crop, the flip a
  reversal of the output columns), applied by two batched matrix products to the decoded images, padded to a
  common size in groups of similar area (``size_groups``) so that a few large images do not inflate the batch.
- colour ops: each op on the samples that drew it (gathered, transformed, scattered back), rounded to a grey
  level after each op as torchvision's uint8 path rounds.
"""
import collections
import io

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from data.folders import decode_bytes, is_jpeg
from data.sampler import sample_seed, seeded
from data.transforms import DeviceInput

PARAM_COLUMNS = ('top', 'left', 'height', 'width', 'flip', 'order0', 'order1', 'order2', 'order3',
                 'brightness', 'contrast', 'saturation', 'hue', 'grayscale', 'blur', 'sigma')
COLUMN = {name: i for i, name in enumerate(PARAM_COLUMNS)}
JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')  # ColorJitter's fn_idx numbering
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

EncodedSample = collections.namedtuple('EncodedSample', 'data size params')
# a batch's files: every file's bytes in one buffer, split at offsets (B + 1,); header sizes (B, 2); params (B, V, P)
PackedFiles = collections.namedtuple('PackedFiles', 'data offsets sizes params')


# ------------------------------------------------------------------ parameters, drawn on the host

def draw_view_params(transform, height, width):
    """One row of ``PARAM_COLUMNS`` for a view of an image of ``height`` x ``width``, drawn from torch's
    random stream exactly as ``transform(image)`` draws them: the same calls in the same order, so the
    stream ends where the transform leaves it (the next view then draws what the CPU path draws). A jitter
    op that is not drawn (ColorJitter not applied, or an op it lacks) has order -1."""
    row = dict.fromkeys(PARAM_COLUMNS, 0.0)
    row.update(brightness=1.0, contrast=1.0, saturation=1.0, order0=-1, order1=-1, order2=-1, order3=-1)
    _draw(transform, torch.empty((3, height, width), device='meta'), row)
    return [float(row[name]) for name in PARAM_COLUMNS]


def _draw(transform, image, row):
    t = transform
    if isinstance(t, v2.Compose):
        for inner in t.transforms:
            _draw(inner, image, row)
    elif isinstance(t, v2.RandomApply):
        if torch.rand(1) >= t.p:  # RandomApply's own test
            return
        for inner in t.transforms:
            _draw(inner, image, row)
    elif isinstance(t, v2.RandomResizedCrop):
        box = t.make_params([image])
        row.update(top=box['top'], left=box['left'], height=box['height'], width=box['width'])
    elif isinstance(t, v2.ColorJitter):
        params = t.make_params([image])
        for k, op in enumerate(params['fn_idx'].tolist()):
            factor = params[f'{JITTER_OPS[op]}_factor']
            if factor is not None:
                row[f'order{k}'], row[JITTER_OPS[op]] = op, factor
    elif isinstance(t, (v2.RandomGrayscale, v2.RandomHorizontalFlip)):
        if torch.rand(1) >= t.p:  # _RandomApplyTransform's test
            return
        row['grayscale' if isinstance(t, v2.RandomGrayscale) else 'flip'] = 1
    elif isinstance(t, v2.GaussianBlur):
        row.update(blur=1, sigma=t.make_params([image])['sigma'][0])
    else:
        raise TypeError(f'the batched --gpu_decode views cannot make {type(t).__name__}')


def view_transforms(views):
    """The transforms of a ``data.transforms.TwoViews``, in the order it applies them (student first)."""
    return [views.student_transform] + ([] if views.single_aug else [views.teacher_transform])


def draw_all_views(views, height, width):
    """(V, P) float64: every view's parameters, from the current stream, as ``views(image)`` draws them."""
    return torch.tensor([draw_view_params(t, height, width) for t in view_transforms(views)], dtype=torch.float64)


def header_size(data):
    """(height, width) from an encoded image's header (PIL reads no pixels for it), or None."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return image.height, image.width
    except Exception:  # a damaged file: the main process decodes it and names it
        return None


class ViewParams:
    """The loader workers' transform with ``--gpu_decode``: encoded bytes -> ``EncodedSample`` (the bytes,
    the size in the header, the views' parameters drawn from the sample's seed; None for a file whose
    header cannot be read, whose views the main process draws once it has decoded it)."""

    def __init__(self, views):
        self.views = views

    def __call__(self, data):
        size = header_size(data)
        return EncodedSample(data, size, None if size is None else draw_all_views(self.views, *size))

    def __repr__(self):
        return f'ViewParams({self.views!r})'


# ------------------------------------------------------------------ pixels, made on the device

def size_groups(shapes, slack=1.5):
    """Index lists of the images padded together: in order of area, an image joins the current group while
    the group's padded area (max height x max width x count) stays within ``slack`` times its images' area.
    One group, in batch order, when the whole batch fits."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], i))
    groups, current, top_h, top_w, area = [], [], 0, 0, 0
    for i in order:
        h, w = shapes[i]
        grown = (max(top_h, h), max(top_w, w), area + h * w)
        if current and grown[0] * grown[1] * (len(current) + 1) > slack * grown[2]:
            groups.append(current)
            current, grown = [], (h, w, h * w)
        current.append(i)
        top_h, top_w, area = grown
    groups.append(current)
    return [sorted(groups[0])] if len(groups) == 1 else groups


def padded(images, dtype):
    """A list of (3, H_i, W_i) tensors -> (n, 3, max H, max W) of ``dtype``, zero-padded: one fill and one
    ``_foreach_copy_`` into views of it (a multi-tensor copy, no per-image Python call). Not
    ``torch.nested``'s ``to_padded_tensor``: on CUDA it copies its size table to the device with a blocking
    copy, a host sync per batch."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    out = torch.zeros((len(images), 3, height, width), dtype=dtype, device=images[0].device)
    torch._foreach_copy_([out[k, :, :i.shape[1], :i.shape[2]] for k, i in enumerate(images)], list(images))
    return out


def resize_weights(start, length, out_size, in_size, flip=None):
    """(n, out_size, in_size) float32: row i holds the weights of output pixel i over the input pixels, as
    torchvision's antialiased bilinear resize of the crop [start, start + length) to ``out_size`` computes
    them (a triangle of half-width max(scale, 1) around the pixel's centre, normalised over the crop);
    ``flip`` (n,) reverses the output pixels where it is 1."""
    start, length = start.view(-1, 1, 1), length.view(-1, 1, 1)
    i = torch.arange(out_size, device=start.device, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.view(-1, 1, 1) > 0, out_size - 1 - i, i)
    scale = length / out_size
    centre = scale * (i + 0.5)  # in the crop's coordinates
    j = torch.arange(in_size, device=start.device, dtype=torch.float32).view(1, 1, -1) - start
    weights = (1 - (j + 0.5 - centre).abs() / scale.clamp(min=1)).clamp(min=0)
    weights = weights * ((j >= 0) & (j < length))
    return weights / weights.sum(-1, keepdim=True)


def crop_resize_flip(images, params, size):
    """(n, 3, H, W) padded images (float) and their (n, P) parameters on the device -> (n, 3, size, size)
    float32 holding whole grey levels: columns first, rounded, then rows (the CPU path's two passes,
    with its uint8 rounding between them)."""
    n, _, height, width = images.shape
    col = lambda name: params[:, COLUMN[name]]
    wx = resize_weights(col('left'), col('width'), size, width, col('flip')).to(images.dtype)
    wy = resize_weights(col('top'), col('height'), size, height).to(images.dtype)
    rows = torch.bmm(images.view(n, 3 * height, width), wx.transpose(1, 2)).round_()
    out = torch.matmul(wy.unsqueeze(1), rows.view(n, 3, height, size))
    return out.float().round_().clamp_(0, 255)


def _gray(x):
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(x, other, factor):
    """What torchvision's uint8 ops end with: blend, clamp, truncate to a grey level."""
    return (x * factor + other * (1 - factor)).clamp_(0, 255).floor_()


def adjust_brightness(x, factor):
    return (x * factor).clamp_(0, 255).floor_()


def adjust_contrast(x, factor):
    return _blend(x, _gray(x).floor_().mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, _gray(x).floor_(), factor)


def adjust_hue(x, factor):
    """Rotate the hue by ``factor`` turns: RGB -> (hue, chroma, max) -> RGB, with the standard
    piecewise-linear hue profile ``max - chroma * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 hue) mod 6``,
    n = 5, 3, 1 for R, G, B; values in [0, 1] as torchvision's uint8 -> float conversion makes them."""
    y = x * (1.0 / 255)
    r, g, b = y.unbind(1)
    top, bottom = y.amax(1), y.amin(1)
    chroma = top - bottom
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(top == r, (g - b) / safe, torch.where(top == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = ((hue / 6 + 1).remainder(1) + factor.view(-1, 1, 1)).remainder(1)
    k = torch.stack([(n + 6 * hue).remainder(6) for n in (5, 3, 1)], 1)
    out = top.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)
    return (out * (255 + 1 - 1e-3)).floor_()  # torchvision's float -> uint8


def to_grayscale(x):
    return _gray(x).floor_().expand_as(x).contiguous()


def gaussian_blur(x, sigma, kernel_size):
    """Per-sample Gaussian blur, torchvision's kernel (taps at integer offsets, exp(-d^2 / 2 sigma^2),
    normalised) and reflect padding, as two depthwise convolutions; rounded as its uint8 path rounds."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    d = torch.arange(-half, half + 1, device=x.device, dtype=torch.float32)
    taps = torch.softmax(-(d.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2), dim=1)  # (n, K)
    taps = taps.repeat_interleave(c, 0)  # one kernel per (sample, channel) plane
    planes = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode='reflect')
    planes = F.conv2d(planes, taps.view(n * c, 1, 1, kernel_size), groups=n * c)
    planes = F.conv2d(planes, taps.view(n * c, 1, kernel_size, 1), groups=n * c)
    return planes.view(n, c, h, w).round_().clamp_(0, 255)


class BatchedViews:
    """The views of a ``data.transforms.TwoViews`` made for a batch at once: ``draw`` gives an image's
    parameters (host), ``__call__`` the views of decoded images from their parameters (device)."""

    def __init__(self, views, compute_dtype=None):
        self.views = views
        self.transforms = view_transforms(views)
        self.sizes = [_find(t, v2.RandomResizedCrop).size[0] for t in self.transforms]
        blurs = [_find(t, v2.GaussianBlur) for t in self.transforms]
        self.blur_kernels = [None if b is None else b.kernel_size[0] for b in blurs]
        self.strong = [_find(t, v2.ColorJitter) is not None or b is not None or _find(t, v2.RandomGrayscale)
                       is not None for t, b in zip(self.transforms, blurs)]
        self.compute_dtype = compute_dtype

    def draw(self, height, width):
        return draw_all_views(self.views, height, width)

    def __call__(self, images, params):
        """``images``: B decoded uint8 (3, H_i, W_i) tensors on one device; ``params``: (B, V, P) host
        tensor. Returns the uint8 batch of each view (a tensor for one view, a tuple for two)."""
        device = images[0].device
        dtype = self.compute_dtype or (torch.float16 if device.type == 'cuda' else torch.float32)
        groups = size_groups([tuple(image.shape[1:]) for image in images])
        plan = IndexPlan()
        group_index = [plan.add(g) for g in groups] if len(groups) > 1 else None
        inverse = plan.add(torch.argsort(torch.tensor(sum(groups, [])))) if len(groups) > 1 else None
        steps = [self._plan_colour(params[:, v], plan) if self.strong[v] else [] for v in range(len(self.sizes))]
        on_device = plan.to(device)
        params = params.to(torch.float32)
        params = (params.pin_memory() if device.type == 'cuda' else params).to(device, non_blocking=True)
        stacks = [padded([images[i] for i in g], dtype) for g in groups]
        outputs = []
        for v, size in enumerate(self.sizes):
            if group_index is None:
                x = crop_resize_flip(stacks[0], params[:, v], size)
            else:
                parts = [crop_resize_flip(stack, params[:, v].index_select(0, on_device[g]), size)
                         for stack, g in zip(stacks, group_index)]
                x = torch.cat(parts).index_select(0, on_device[inverse])
            for op, index, column in steps[v]:
                idx = on_device[index]
                factor = params[:, v, COLUMN[column]].index_select(0, idx).view(-1, 1, 1, 1) if column else None
                args = () if factor is None else (factor, self.blur_kernels[v]) if op is gaussian_blur else (factor,)
                x.index_copy_(0, idx, op(x.index_select(0, idx), *args))
            outputs.append(x.to(torch.uint8))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _plan_colour(self, params, plan):
        """[(op, plan index, factor column)] of a strong view, in the transform's order: the four jitter
        positions (each op on the samples that drew it there), then grayscale, then blur. Host work only."""
        steps = []
        ops = {0: adjust_brightness, 1: adjust_contrast, 2: adjust_saturation, 3: adjust_hue}
        for k in range(4):
            order = params[:, COLUMN[f'order{k}']]
            for op_id, op in ops.items():
                chosen = torch.nonzero(order == op_id).flatten()
                if len(chosen):
                    steps.append((op, plan.add(chosen), JITTER_OPS[op_id]))
        for column, op in (('grayscale', to_grayscale), ('blur', gaussian_blur)):
            chosen = torch.nonzero(params[:, COLUMN[column]] > 0).flatten()
            if len(chosen):
                steps.append((op, plan.add(chosen), 'sigma' if column == 'blur' else None))
        return steps


class IndexPlan:
    """Index lists decided on the host, moved to the device in one copy (``to``) and sliced there."""

    def __init__(self):
        self.parts = []

    def add(self, index):
        self.parts.append(torch.as_tensor(index, dtype=torch.int64).flatten())
        return len(self.parts) - 1

    def to(self, device):
        if not self.parts:
            return []
        flat = torch.cat(self.parts)
        if device.type == 'cuda':
            flat = flat.pin_memory()
        return torch.split(flat.to(device, non_blocking=True), [len(p) for p in self.parts])


def _find(transform, kind):
    """The first transform of ``kind`` inside a (nested) v2 Compose / RandomApply, or None."""
    if isinstance(transform, kind):
        return transform
    for inner in getattr(transform, 'transforms', []):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------ the loader's batch -> the step's input

def packed_collate(batch):
    """Batch of (index, ``EncodedSample``, label) -> (index, ``PackedFiles``, label): six tensors whatever the batch
    size, so a worker hands over a few shared storages rather than two per image."""
    indices, samples, labels = zip(*batch)
    lengths = torch.tensor([len(s.data) for s in samples])
    blank = next((torch.zeros_like(s.params) for s in samples if s.params is not None), torch.zeros(1, len(COLUMN)))
    packed = PackedFiles(torch.cat([s.data for s in samples]), torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]),
                         torch.tensor([s.size or (0, 0) for s in samples]),
                         torch.stack([blank if s.params is None else s.params for s in samples]))
    return torch.tensor(indices), packed, torch.tensor(labels)


def unpack(packed):
    """``PackedFiles`` -> its ``EncodedSample`` list, the files views into the one buffer (size 0 x 0: unread)."""
    files = packed.data.tensor_split(packed.offsets[1:-1])
    return [EncodedSample(data, size, params) if size[0] else EncodedSample(data, None, None)
            for data, size, params in zip(files, packed.sizes.tolist(), packed.params)]


def decode_batch_on(device, encoded, name_of):
    """Decode encoded images on ``device``: one batched nvjpeg call for JPEGs on CUDA; other files (PNG, ...)
    and what nvjpeg refuses (CMYK, ...) on the CPU (``decode_bytes``), then moved. ``name_of(j)`` names the j-th
    file in the error of a file neither can read. Returns uint8 (3, H, W) images."""
    if all(is_jpeg(data) for data in encoded):
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    return [decode_one_on(device, data, name_of, j) for j, data in enumerate(encoded)]


def decode_one_on(device, data, name_of, position):
    """One encoded image on ``device``: a JPEG by the device decoder if it can, anything else by ``decode_bytes``."""
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass
    return decode_bytes(data, name_of(position)).to(device)


def batched_views_on(device, samples, batched, name_of, seed_of):
    """The views of a batch of ``EncodedSample`` (or plain bytes) decoded on ``device``, made by ``batched`` (a
    ``BatchedViews``). An image whose parameters are missing (plain bytes, an unreadable header) or were drawn for
    another size than it decodes to has them drawn here from its sample's seed ``seed_of(j)``, as a worker would."""
    sized = [s if isinstance(s, EncodedSample) else EncodedSample(s, None, None) for s in samples]
    images = decode_batch_on(device, [s.data for s in sized], name_of)
    params = []
    for j, (sample, image) in enumerate(zip(sized, images)):
        if sample.params is None or tuple(sample.size) != tuple(image.shape[1:]):
            with seeded(seed_of(j)):
                sample = sample._replace(params=batched.draw(*image.shape[1:]))
        params.append(sample.params)
    return batched(images, torch.stack(params))


class GpuDecodedInput(DeviceInput):
    """``DeviceInput`` for ``--gpu_decode`` batches (``PackedFiles``, or a list of ``EncodedSample``): the files are
    decoded and their views made on the device for the whole batch, each image's from its sample's seed in the
    epoch; ``samples`` is the dataset's (path, label) list, which names a file that cannot be read."""

    def __init__(self, device, memory_format, views, samples, seed, dtype=None):
        super().__init__(device, memory_format, views.single_aug, dtype)
        self.batched, self.samples, self.seed = BatchedViews(views), samples, seed

    def __call__(self, index, encoded, epoch):
        return super().__call__(index, self.views(index, encoded, epoch), epoch)

    def views(self, index, encoded, epoch):
        """The batch's uint8 view(s) on the device."""
        encoded = unpack(encoded) if isinstance(encoded, PackedFiles) else encoded
        return batched_views_on(self.device, encoded, self.batched, lambda j: self.samples[int(index[j])][0],
                                lambda j: sample_seed(self.seed, epoch, int(index[j])))
