"""The distillation pair: the trained student (``SimReg``: backbone + regression head) and the frozen teachers it
regresses, and the autocast dtype both run in.

A teacher is called on a batch: ``teacher(index, view)`` returns its targets for those samples. A ``LiveTeacher``
runs its network on the teacher's view; a ``CachedTeacher`` reads the rows of a feature cache
(``data.teacher_cache``) by sample index and needs no view. ``needs_view`` says which, and is the one thing the rest
of the code asks (the loader draws a teacher view only when some teacher needs one). Several teachers
(``--arch_teacher a,b``) give one head each, named by ``head_names``; the per-teacher flags (``--teacher_weights``,
``--teacher_feats``, ``--teacher_image_size``, ``--teacher_norm``) are comma-separated lists.

Each teacher takes its own input (``data.transforms.NetInput``): ``--teacher_image_size`` (default: the student's)
and its family's mean/std (the network's ``input_mean`` / ``input_std`` where it has them, else ImageNet's), or
``--teacher_norm``'s; a cached teacher's is the one its cache records.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.teacher_cache import open_teacher_cache, teacher_input_of
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, NORMS, NetInput
from models.backbones import TEACHER_ARCHS, is_teacher_arch
from models.dense import FAMILIES, family, feature_and_map
from models.loading import load_backbone
from models.openclip import weights_file
from models.presets import resolve_weights
from models.vit import channels_last_helps
from utils import distributed as dist_utils
from utils.checkpoint import file_digest
from utils.errors import SimRegError

# --precision: the autocast dtype of each choice (fp32: autocast off)
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def default_precision(device):
    """--precision when not given: bf16 on GPUs that compute it natively (compute capability 8.0+), fp16 with the
    grad scaler on older GPUs (V100, RTX 20xx: bf16 only emulated), fp32 on CPUs."""
    if device.type != 'cuda':
        return 'fp32'
    return 'bf16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'fp16'


class SimReg(nn.Module):
    """Student backbone ``encoder_q`` and regression head ``predict_q`` (SimReg's names, so its checkpoint keys). With
    several teachers ``predict_q`` is a ModuleDict of one head per teacher and the forward returns a dict. The frozen
    teachers stay outside: never part of DDP or the optimizer.

    ``dense_q`` (--dense_weight): the dense head, or a ModuleDict of one per teacher with dense targets. Given
    ``grids`` ({head name: the teacher's (h, w)}), the forward also returns the dense predictions: the dense head on
    the backbone's map (``models.dense``, from the same forward as its feature), per location, then resized to each
    teacher's grid (bilinear). The head runs before the resize: on the student's locations, fewer than a ViT
    teacher's (7x7 vs 16x16 at 224 px), and its BatchNorm sees the student's own locations, not interpolated ones."""

    def __init__(self, encoder_q, predict_q, dense_q=None):
        super().__init__()
        self.encoder_q = encoder_q
        self.predict_q = predict_q
        if dense_q is not None:  # no attribute otherwise: the paper's student, its modules and keys unchanged
            self.dense_q = dense_q

    def forward(self, images, grids=None):
        if not grids:
            return self.heads(self.encoder_q(images))
        features, fmap = feature_and_map(self.encoder_q, images)
        dense = self.dense_q.items() if isinstance(self.dense_q, nn.ModuleDict) else [(next(iter(grids)), self.dense_q)]
        return self.heads(features), {name: F.interpolate(head(fmap), size=tuple(grids[name]), mode='bilinear')
                                      for name, head in dense}

    def heads(self, features):
        if isinstance(self.predict_q, nn.ModuleDict):
            return {name: head(features) for name, head in self.predict_q.items()}
        return self.predict_q(features)


def in_float64(model, teachers):
    """--precision fp64: the student and the live teachers compute in float64, their float32 input cast on entry
    (the student's backbone casts it, for the online k-NN too)."""
    model.double()
    for network in [model.encoder_q] + [t.network for t in teachers.values() if t.needs_view]:
        network.double().register_forward_pre_hook(_inputs_to_float64)


def _inputs_to_float64(module, inputs):
    return (inputs[0].double(), *inputs[1:])


class LiveTeacher:
    """A frozen network run on the teacher's view of each batch."""

    needs_view = True
    boxes = None

    def __init__(self, network, info, net_input=None):
        self.network = network.eval().requires_grad_(False)  # a fixed function of its input
        self.feat_dim = network.feat_dim
        self.info = info
        self.input = net_input  # its NetInput: the key of its view when the teachers take different ones

    def to(self, device, memory_format=torch.contiguous_format, dtype=None):
        """On ``device``; ``dtype``: the autocast dtype on GPUs, so that autocast does not cast the frozen
        weights again at every step."""
        if not channels_last_helps(self.network):
            memory_format = torch.contiguous_format  # --channels_last is for the convolutional nets
        self.network.to(device, dtype, memory_format=memory_format)
        return self

    def __call__(self, index, view, amp_dtype=None, dense=False):
        """Its features of the batch; ``dense``: (features, dense targets (B, D, h, w)) from one forward."""
        view = view[self.input] if isinstance(view, dict) else view
        with torch.inference_mode(), torch.autocast(view.device.type, dtype=amp_dtype,
                                                    enabled=amp_dtype is not None):
            out = feature_and_map(self.network, view) if dense else self.network(view)
        # cloned outside inference mode: an inference tensor cannot be saved for the loss's backward
        return tuple(t.clone() for t in out) if dense else out.clone()

    def map_channels(self):
        """The channels of its dense targets (a blank image at its input size), None for a family without them."""
        if family(self.network) not in FAMILIES:
            return None
        weight = next(self.network.parameters())
        blank = torch.zeros(1, 3, self.input.size, self.input.size, device=weight.device, dtype=weight.dtype)
        with torch.inference_mode():
            return feature_and_map(self.network, blank)[1].shape[1]


class CachedTeacher:
    """Teacher features read from a ``data.teacher_cache`` by sample index, or by (sample index, view)
    for a multi-view cache, whose stored view ``boxes`` the student replays; no network, no view."""

    needs_view = False

    def __init__(self, cache, info):
        self.cache = cache
        self.feat_dim = cache.feat_dim
        self.info = info
        self.boxes = cache.boxes
        self.device = torch.device('cpu')

    def to(self, device, memory_format=None, dtype=None):
        self.device = device  # the rows stay fp16; the loss casts them to the prediction's dtype
        return self

    def __call__(self, index, view=None, amp_dtype=None):
        return self.cache.rows(index, pin_memory=self.device.type == 'cuda').to(self.device, non_blocking=True)


def head_names(archs):
    """What each teacher's head is called in checkpoints: its arch, numbered when archs repeat."""
    return [arch if archs.count(arch) == 1 else f'{arch}_{i}' for i, arch in enumerate(archs)]


def split_per_teacher(value, count, flag):
    """A comma-separated flag with one entry per teacher ('' where a teacher has none)."""
    if not value:
        return [''] * count
    entries = value.split(',')
    if len(entries) != count:
        raise SimRegError(f'{flag} lists {len(entries)} entries for {count} teachers (--arch_teacher): '
                          f'give one per teacher, empty ones included (e.g. "a.pth,")')
    return entries


def per_teacher(value, count, flag):
    """A per-teacher flag given once for every teacher, or as a comma-separated list of one per teacher."""
    return split_per_teacher(value, count, flag) if ',' in (value or '') else [value or ''] * count


def teacher_input(network, size, norm=''):
    """The ``NetInput`` of a teacher network at ``size``: ``norm`` 's mean/std (a ``NORMS`` name), else its family's
    (the network's ``input_mean`` / ``input_std``), else ImageNet's."""
    if norm:
        return NetInput(size, *NORMS[norm])
    return NetInput(size, tuple(getattr(network, 'input_mean', IMAGENET_MEAN)),
                    tuple(getattr(network, 'input_std', IMAGENET_STD)))


def build_teachers(args, dataset, ctx, log):
    """{head name: LiveTeacher | CachedTeacher}, in --arch_teacher order, on ``ctx.device`` (live ones in the
    autocast dtype on GPUs). With --use_cache the one teacher, or each teacher that has a --teacher_feats entry,
    is read from its cache."""
    archs = args.arch_teacher.split(',')
    unknown = [a for a in archs if not is_teacher_arch(a)]
    if unknown:
        raise SimRegError(f'unknown --arch_teacher {",".join(unknown)}: choose from {", ".join(TEACHER_ARCHS)} '
                          f'or open_clip/<model name>')
    weights = split_per_teacher(args.teacher_weights, len(archs), '--teacher_weights')
    feats = split_per_teacher(args.teacher_feats, len(archs), '--teacher_feats')
    sizes = per_teacher(args.teacher_image_size, len(archs), '--teacher_image_size')
    norms = per_teacher(args.teacher_norm, len(archs), '--teacher_norm')
    if any(feats) and not args.use_cache:
        raise SimRegError('--teacher_feats is read only with --use_cache: add --use_cache')
    teachers = {}
    for name, arch, weight, feat, size, norm in zip(head_names(archs), archs, weights, feats, sizes, norms):
        if args.use_cache and (feat or len(archs) == 1):
            teachers[name] = cached_teacher(feat, dataset, args.image_size, log, int(size or 0), norm).to(ctx.device)
        else:
            teachers[name] = live_teacher(name, arch, weight, len(archs), args.teacher_fc,
                                          int(size or args.image_size), norm).to(
                ctx.device, ctx.memory_format, ctx.amp_dtype if ctx.device.type == 'cuda' else None)
    return teachers


def cached_teacher(path, dataset, image_size, log, teacher_size=0, norm=''):
    """The teacher of a cache; ``teacher_size`` / ``norm`` (--teacher_image_size, --teacher_norm), where given,
    must be the input the cache's teacher took."""
    cache = open_teacher_cache(path, dataset, log.info)
    if cache.num_views and cache.meta['image_size'] != image_size:
        raise SimRegError(f"{cache.path} holds teacher features of views cropped to {cache.meta['image_size']}px, "
                          f"the student would replay them at {image_size}px: pass --image_size "
                          f"{cache.meta['image_size']} (or build the cache at this size)")
    cached = teacher_input_of(cache.meta)
    cached = cached._replace(size=cached.size or teacher_size or None)  # a converted original cache: unknown
    wanted = NetInput(teacher_size or cached.size, *(NORMS[norm] if norm else (cached.mean, cached.std)))
    if wanted != cached:
        raise SimRegError(f'{cache.path} was built with teacher input {cached.describe()}, the run asks for '
                          f'{wanted.describe()}: rebuild the cache with cache_teacher_feats.py --teacher_image_size '
                          f'{wanted.size}{f" --teacher_norm {norm}" if norm else ""}, or drop --teacher_image_size '
                          f'and --teacher_norm to train on the cache\'s')
    if cache.meta.get('image_size') not in (None, image_size):
        log.warning('note: %s holds teacher features of %spx center crops, the student trains on %dpx crops',
                    cache.path, cache.meta['image_size'], image_size)
    info = {**cache.meta['teacher'], 'cache': os.path.abspath(cache.path), 'feat_dim': cache.feat_dim,
            'input': cached._asdict()}
    return CachedTeacher(cache, info)


def live_teacher(name, arch, weight, count, teacher_fc, size, norm=''):
    if not weight:
        raise SimRegError(f'no weights for teacher {name}: pass --teacher_weights PATH (a checkpoint of '
                          f'{arch}{", one per teacher" if count > 1 else ""})')
    weight = weights_file(arch, weight)  # an open_clip pretrained tag: its file in the local cache
    dist_utils.run_on_main(lambda: resolve_weights(weight))  # a preset is downloaded once, by rank 0
    path = resolve_weights(weight)
    network = load_backbone(arch, path, keep_fc=teacher_fc)
    sha256 = dist_utils.run_on_main(lambda: file_digest(path))  # only rank 0 records it
    net_input = teacher_input(network, size, norm)
    if hasattr(network, 'resize'):  # an open_clip tower at another size: resampled (or refused) now
        network.resize((net_input.size,) * 2)
    info = {'arch': arch, 'weights': os.path.abspath(path), 'sha256': sha256,
            'feat_dim': network.feat_dim, 'teacher_fc': teacher_fc, 'input': net_input._asdict()}
    return LiveTeacher(network, info, net_input)
