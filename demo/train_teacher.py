"""The demo's teacher: a ResNet trained *with labels* on the generated dataset, standing in for a self-supervised one.
OUTPUT is a plain torchvision ResNet state dict (``fc`` too, which the teacher loader drops), reused if it exists.
``--dense``: DATA is a segmentation folder (eval_dense.py's plain layout) and each pixel's class is learnt through a
1x1 classifier on the last feature map, upsampled to the mask (the classifier is not saved): a teacher whose map
segments the images.

    python -m demo.train_teacher demo_data/synthetic --output demo_data/teacher_resnet18.pth --image_size 32
    python -m demo.train_teacher demo_data/synthetic_dense --dense --num_classes 11 --output ... --image_size 128
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from data.folders import build_dataset, decode_rgb
from data.transforms import eval_transform, normalize
from evaluation import dense_probe, features
from models.backbones import TORCHVISION_RESNETS, build_backbone
from models.dense import feature_map
from utils.checkpoint import save_atomic
from utils.errors import SimRegError, exit_on_user_error

CROP_SCALE = (0.35, 1.0)  # milder than the distillation's 0.2: a small crop of a one-shape image may miss the shape


def get_args_parser():
    p = argparse.ArgumentParser('The demo teacher: a short supervised run on the generated data', add_help=True)
    p.add_argument('data', help='dataset root holding train/ (and val/, to report the accuracy)')
    p.add_argument('--output', required=True, help='teacher file to write; reused if it exists')
    p.add_argument('--arch', default='resnet18', choices=TORCHVISION_RESNETS)
    p.add_argument('--image_size', type=int, default=32, help='crop size (the distillation\'s)')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--learning_rate', type=float, default=2e-3,
                   help='peak lr of AdamW\'s one-cycle schedule (15%% warm-up, then cosine to ~0)')
    p.add_argument('--weight_decay', type=float, default=0.05)
    p.add_argument('--label_smoothing', type=float, default=0.1)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dense', action='store_true', help='DATA is a segmentation folder (train/ and val/, each with '
                   'images/ and masks/): learn per-pixel classes through a 1x1 classifier on the last feature map')
    p.add_argument('--num_classes', type=int, help='--dense: classes of the masks (labels 0..n-1, 255 = ignore)')
    return p


class Segmentation(Dataset):
    """(index, image, mask) of an eval_dense.py split, one random view of both."""

    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        image = tv_tensors.Image(decode_rgb(self.split.samples[index][0]))
        image, mask = self.transform(image, self.split.checked_mask(index))
        return index, image.as_subclass(torch.Tensor), mask[0].as_subclass(torch.Tensor)


def segmentation_loss(model, classifier, images, masks, label_smoothing):
    """Cross-entropy of each labelled pixel, the 1x1 classifier's logits upsampled (bilinear) to the mask."""
    logits = dense_probe.logits_at(classifier, feature_map(model, images), masks.shape[-2:])
    return F.cross_entropy(logits, masks.long(), ignore_index=dense_probe.IGNORE, label_smoothing=label_smoothing)


@torch.no_grad()
def dense_miou(model, classifier, split, workers, device):
    """The teacher's own mIoU on ``split`` (eval_dense.py's view), through the classifier it was trained with."""
    maps = features.extract_features(dense_probe.DenseModel(model), split, 256, workers, device,
                                     desc='val feature maps', l2_normalize=False)
    masks = dense_probe.read_masks(split, workers)
    return dense_probe.evaluate(classifier, maps, masks, split.num_classes, 256, device)['miou']


@torch.no_grad()
def accuracy(model, loader, device):
    model.eval()
    correct = total = 0
    for _, images, labels in loader:
        logits = model(normalize(images.to(device)))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def main(args):
    """Train and write the teacher; returns the output path."""
    if os.path.isfile(args.output):
        print(f'demo/train_teacher.py: reusing the demo teacher {args.output} (delete it to train it again)')
        return args.output
    if args.epochs < 1:
        raise SimRegError(f'--epochs must be at least 1, got {args.epochs}')
    torch.manual_seed(args.seed)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    crop = v2.RandomResizedCrop(args.image_size, scale=CROP_SCALE, antialias=True)
    augment = v2.Compose([crop, v2.RandomHorizontalFlip()])
    model = build_backbone(args.arch)
    if args.dense:
        splits = dense_probe.open_splits(args.data, args.image_size, args.num_classes)
        train_set = Segmentation(splits['train'], augment)
        classifier = nn.Conv2d(model.feat_dim, splits['train'].num_classes, 1).to(device)
        loss_of = lambda images, masks: segmentation_loss(model, classifier, images, masks, args.label_smoothing)
    else:
        train_set = build_dataset(args.data, 'train', augment)
        model.fc = nn.Linear(model.feat_dim, len(train_set.classes))  # a plain torchvision ResNet's state dict
        classifier = nn.Identity()
        loss_of = lambda images, labels: F.cross_entropy(model(images), labels, label_smoothing=args.label_smoothing)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    model.to(device)
    # AdamW with a one-cycle schedule: a short warm-up, then it converges within a few hundred steps
    parameters = [*model.parameters(), *classifier.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, epochs=args.epochs,
                                                   steps_per_epoch=len(loader), pct_start=0.15)
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for _, images, labels in loader:
            loss = loss_of(normalize(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f'teacher epoch {epoch}/{args.epochs}  loss {total / len(loader):.4f}  '
              f'{time.time() - started:.0f}s', flush=True)
    note = ''
    if args.dense:
        miou = dense_miou(model, classifier, splits['val'], args.workers, device)
        note = f', mIoU on val through its 1x1 classifier {miou:.1f}'
    elif os.path.isdir(os.path.join(args.data, 'val')):
        val_set = build_dataset(args.data, 'val', eval_transform(args.image_size))
        top1 = accuracy(model, DataLoader(val_set, batch_size=256, num_workers=args.workers), device)
        note = f', classifier top-1 on val {top1:.1f}%'
    save_atomic({'state_dict': model.cpu().state_dict()}, args.output)
    labels = 'WITH PER-PIXEL LABELS' if args.dense else 'WITH LABELS'
    print(f'demo/train_teacher.py: wrote {args.output}: a {args.arch} trained {labels} for {args.epochs} epochs '
          f'at {args.image_size}px in {time.time() - started:.0f}s{note}; it stands in for a self-supervised teacher')
    return args.output


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
