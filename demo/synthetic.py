"""A deterministic, learnable demo dataset: one procedurally drawn shape per image, its kind the class (colour, size,
position, rotation, background and noise are random). JPEGs in ``OUT/{train,val}/<class>/``; each image's RNG is
seeded by (seed, split, class, index) alone. ``--dense DIR`` also writes the segmentation layout eval_dense.py reads:
``DIR/{train,val}/images/<class>_<index>.jpg`` (the same JPEGs, hard-linked) and ``masks/`` of PNG index masks, the
shape's class inside the shape and ``num_classes`` (the background) outside.

    python -m demo.synthetic OUT [--num_classes 10 --train_per_class 150 --val_per_class 50 --image_size 64]
                                 [--dense DIR]
"""
import argparse
import json
import os
import shutil
import uuid

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import SimRegError, exit_on_user_error

SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring', 'ellipse', 'hexagon', 'crescent', 'arrow')
SPLITS = ('train', 'val')
JPEG_QUALITY = 90
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, so edges stay clean at 32 px
GENERATOR_VERSION = 2  # bump when drawing changes, so old datasets are regenerated
MANIFEST = 'synthetic.json'
# shapes keep one orientation within +-20 degrees (a star's point, an arrow's head one way): easier to learn at 32 px
MAX_ROTATION = np.pi / 9


def class_names(num_classes):
    """``00_circle``, ``01_square``, ...: sorted folder order equals label order."""
    return [f'{c:02d}_{SHAPES[c]}' for c in range(num_classes)]


def regular_polygon(n):
    angles = 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], 1)


def star(inner, points=5):
    radii = np.tile([1.0, inner], points)
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)


def cross(a):
    """A plus sign whose arms are ``2 a`` wide."""
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                     (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)])


def arrow(shaft=0.22, head=0.6, head_length=0.8):
    """Points along +x: a shaft from -1 ending in a triangular head at +1."""
    neck = 1 - head_length
    return np.array([(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0),
                     (neck, head), (neck, shaft), (-1, shaft)])


DISC = regular_polygon(64)
# unit outlines without a random parameter (a ring's and a crescent's hole is cut afterwards)
OUTLINES = {'circle': DISC, 'ring': DISC, 'crescent': DISC, 'square': regular_polygon(4) * 0.85,
            'triangle': regular_polygon(3), 'hexagon': regular_polygon(6), 'arrow': arrow()}


def shape_mask(kind, size, rng):
    """A ``size`` x ``size`` uint8 mask (255 inside) of one randomly placed, sized and rotated ``kind``."""
    big = size * SUPERSAMPLE
    radius = rng.uniform(0.3, 0.42) * big
    centre = rng.uniform(radius, big - radius, size=2)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def place(unit_points):
        return [tuple(p) for p in centre + radius * unit_points @ rotation.T]

    mask = Image.new('L', (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind == 'star':
        outline = star(inner=rng.uniform(0.38, 0.5))
    elif kind == 'cross':
        outline = cross(rng.uniform(0.28, 0.38))
    elif kind == 'ellipse':
        outline = DISC * [1.0, rng.uniform(0.4, 0.55)]
    elif kind in OUTLINES:
        outline = OUTLINES[kind]
    else:
        raise ValueError(f'unknown shape {kind}')
    draw.polygon(place(outline), fill=255)
    if kind == 'ring':
        draw.polygon(place(DISC * rng.uniform(0.5, 0.65)), fill=0)
    elif kind == 'crescent':
        draw.polygon(place(DISC * rng.uniform(0.8, 0.9) + [rng.uniform(0.4, 0.55), 0]), fill=0)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX))


def smooth_noise(size, cells, rng):
    """Value noise: a coarse random grid upsampled bicubically, roughly in [0, 1]."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)) / 255.0


def background(size, rng):
    """A float RGB background: a base colour, a gentle gradient and faint blotches (plain: quick to learn at 32 px)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 215, size=3)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(direction) * xx + np.sin(direction) * yy - 0.5
    gradient = ramp[..., None] * rng.uniform(-40, 40, 3)
    blotches = (smooth_noise(size, rng.integers(3, 6), rng)[..., None] - 0.5) * rng.uniform(-25, 25, 3)
    return base + gradient + blotches


def shape_colour(background_mean, rng):
    """A random colour far enough from the background's mean that the shape stays visible."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - background_mean) > 110:
            return colour


def draw(kind, size, rng):
    """(RGB uint8 image of a shape of ``kind`` on a textured, noisy background, the shape's uint8 coverage mask)."""
    canvas = background(size, rng)
    coverage = shape_mask(kind, size, rng)
    alpha = coverage[..., None] / 255.0
    colour = shape_colour(canvas.mean((0, 1)), rng)
    shading = (smooth_noise(size, 4, rng)[..., None] - 0.5) * rng.uniform(0, 30)
    image = canvas * (1 - alpha) + (colour + shading) * alpha
    image += rng.normal(0, rng.uniform(2, 6), image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), coverage


def is_complete(out_dir, settings):
    """Whether ``out_dir`` holds a finished dataset made with ``settings``: manifest (written last) and all images."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            if json.load(f) != settings:
                return False
        return all(len(os.listdir(os.path.join(out_dir, split, name))) == settings[f'{split}_per_class']
                   for split in SPLITS for name in class_names(settings['num_classes']))
    except (OSError, ValueError):
        return False


def image_rng(settings, split, label, index):
    """The RNG of one image: independent of every other image and of the dataset's counts."""
    return np.random.default_rng([settings['seed'], SPLITS.index(split), label, index])


def write_split(root, split, settings):
    for label, name in enumerate(class_names(settings['num_classes'])):
        folder = os.path.join(root, split, name)
        os.makedirs(folder)
        for index in range(settings[f'{split}_per_class']):
            pixels = draw(SHAPES[label], settings['image_size'], image_rng(settings, split, label, index))[0]
            # 4:4:4 chroma keeps the edges of small coloured shapes sharp
            Image.fromarray(pixels).save(os.path.join(folder, f'{index:04d}.jpg'),
                                         quality=JPEG_QUALITY, subsampling=0)


def settings_of(num_classes, train_per_class, val_per_class, image_size, seed):
    """The settings a dataset's manifest records, once checked (a SimRegError names the bad flag)."""
    if not 2 <= num_classes <= len(SHAPES):
        raise SimRegError(f'--num_classes must be between 2 and {len(SHAPES)}, got {num_classes}')
    if train_per_class < 1 or val_per_class < 1:
        raise SimRegError(f'--train_per_class and --val_per_class must be at least 1, '
                          f'got {train_per_class} and {val_per_class}')
    if image_size < 16:
        raise SimRegError(f'--image_size must be at least 16 to draw recognisable shapes, got {image_size}')
    if seed < 0:
        raise SimRegError(f'--seed must be non-negative, got {seed}')
    return {'generator_version': GENERATOR_VERSION, 'num_classes': num_classes, 'train_per_class': train_per_class,
            'val_per_class': val_per_class, 'image_size': image_size, 'seed': seed}


def publish(out_dir, settings, complete, write):
    """Make ``out_dir`` with ``write(folder)`` and then the manifest in a hidden folder beside it, renamed into place
    at the end, or reuse it when ``complete(out_dir)``; returns ``out_dir``. Only an empty folder or one made here
    (with a manifest) is ever replaced: never a user's data."""
    out_dir = os.path.abspath(out_dir)
    if complete(out_dir):
        return out_dir
    replaceable = os.path.isdir(out_dir) and (not os.listdir(out_dir)
                                              or os.path.exists(os.path.join(out_dir, MANIFEST)))
    if os.path.exists(out_dir) and not replaceable:
        raise SimRegError(f'{out_dir} exists and holds no synthetic dataset: pass a new or empty folder')
    parent, name = os.path.split(out_dir)
    partial = os.path.join(parent, f'.{name}.partial-{uuid.uuid4().hex[:12]}')
    os.makedirs(partial)
    try:
        write(partial)
        with open(os.path.join(partial, MANIFEST), 'w') as f:
            json.dump(settings, f, indent=1)
        if complete(out_dir):  # another process finished the same dataset meanwhile
            return out_dir
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def generate(out_dir, num_classes=10, train_per_class=150, val_per_class=50, image_size=64, seed=0):
    """Write the dataset to ``out_dir``, or reuse a complete one with the same settings; returns ``out_dir``."""
    settings = settings_of(num_classes, train_per_class, val_per_class, image_size, seed)
    return publish(out_dir, settings, lambda folder: is_complete(folder, settings),
                   lambda folder: [write_split(folder, split, settings) for split in SPLITS])


def dense_is_complete(out_dir, settings):
    """Whether ``out_dir`` holds a finished segmentation layout of a dataset made with ``settings``."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            if json.load(f) != settings:
                return False
        return all(len(os.listdir(os.path.join(out_dir, split, kind))) == settings[f'{split}_per_class'] *
                   settings['num_classes'] for split in SPLITS for kind in ('images', 'masks'))
    except (OSError, ValueError):
        return False


def write_dense_split(root, out_dir, split, settings):
    images, masks = os.path.join(out_dir, split, 'images'), os.path.join(out_dir, split, 'masks')
    os.makedirs(images)
    os.makedirs(masks)
    for label, name in enumerate(class_names(settings['num_classes'])):
        for index in range(settings[f'{split}_per_class']):
            source, stem = os.path.join(root, split, name, f'{index:04d}.jpg'), f'{name}_{index:04d}'
            try:
                os.link(source, os.path.join(images, f'{stem}.jpg'))
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(source, os.path.join(images, f'{stem}.jpg'))
            # the drawing again, from the image's own RNG: the mask is the class where the shape covers at least
            # half a pixel, else num_classes (the background)
            coverage = draw(SHAPES[label], settings['image_size'], image_rng(settings, split, label, index))[1]
            mask = np.where(coverage >= 128, label, settings['num_classes']).astype(np.uint8)
            Image.fromarray(mask).save(os.path.join(masks, f'{stem}.png'))


def generate_dense(root, out_dir):
    """Write the segmentation layout (see the module's doc) of the finished dataset ``root`` to ``out_dir``, or
    reuse a complete one of a dataset with the same settings; returns ``out_dir``."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            settings = json.load(f)
    except (OSError, ValueError):
        raise SimRegError(f'{root} holds no synthetic dataset: make it first (python -m demo.synthetic)') from None
    return publish(out_dir, settings, lambda folder: dense_is_complete(folder, settings),
                   lambda folder: [write_dense_split(root, folder, split, settings) for split in SPLITS])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out', help='dataset root to create (gets train/ and val/)')
    parser.add_argument('--num_classes', type=int, default=10, help=f'at most {len(SHAPES)}')
    parser.add_argument('--train_per_class', type=int, default=150)
    parser.add_argument('--val_per_class', type=int, default=50)
    parser.add_argument('--image_size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--dense', metavar='DIR', help='also write the segmentation layout (images/ + masks/) here')
    args = parser.parse_args(argv)
    options = {name: value for name, value in vars(args).items() if name not in ('out', 'dense')}
    reused = is_complete(os.path.abspath(args.out), settings_of(**options))
    out_dir = generate(args.out, **options)
    total = args.num_classes * (args.train_per_class + args.val_per_class)
    print(f"{'reused' if reused else 'wrote'} {total} images of {args.num_classes} classes "
          f"({args.image_size}px, seed {args.seed}) in {out_dir}")
    if args.dense:
        print(f'their masks (class {args.num_classes}: background) and images in '
              f'{generate_dense(out_dir, args.dense)}')


if __name__ == '__main__':
    exit_on_user_error(main)
