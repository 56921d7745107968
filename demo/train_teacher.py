"""The demo's teacher: a ResNet trained *with labels* on the generated dataset, standing in for a self-supervised one.
OUTPUT is a plain torchvision ResNet state dict (``fc`` too, which the teacher loader drops), reused if it exists.

    python -m demo.train_teacher demo_data/synthetic --output demo_data/teacher_resnet18.pth --image_size 32
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from data.folders import build_dataset
from data.transforms import eval_transform, normalize
from models.backbones import TORCHVISION_RESNETS, build_backbone
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
    return p


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
    train_set = build_dataset(args.data, 'train', v2.Compose([crop, v2.RandomHorizontalFlip()]))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)
    model = build_backbone(args.arch)
    model.fc = nn.Linear(model.feat_dim, len(train_set.classes))  # a plain torchvision ResNet's state dict
    model.to(device)
    # AdamW with a one-cycle schedule: a short warm-up, then it converges within a few hundred steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, epochs=args.epochs,
                                                   steps_per_epoch=len(loader), pct_start=0.15)
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total = 0.0
        for _, images, labels in loader:
            loss = F.cross_entropy(model(normalize(images.to(device))), labels.to(device),
                                   label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        print(f'teacher epoch {epoch}/{args.epochs}  loss {total / len(loader):.4f}  '
              f'{time.time() - started:.0f}s', flush=True)
    note = ''
    if os.path.isdir(os.path.join(args.data, 'val')):
        val_set = build_dataset(args.data, 'val', eval_transform(args.image_size))
        top1 = accuracy(model, DataLoader(val_set, batch_size=256, num_workers=args.workers), device)
        note = f', classifier top-1 on val {top1:.1f}%'
    save_atomic({'state_dict': model.cpu().state_dict()}, args.output)
    print(f'demo/train_teacher.py: wrote {args.output}: a {args.arch} trained WITH LABELS for {args.epochs} epochs '
          f'at {args.image_size}px in {time.time() - started:.0f}s{note}; it stands in for a self-supervised teacher')
    return args.output


if __name__ == '__main__':
    exit_on_user_error(lambda: main(get_args_parser().parse_args()))
