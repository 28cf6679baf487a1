"""Training-loop throughput against a plain DataLoader loop, and the cost of per-epoch checkpoints.

Both loops do the same SGD steps on the same synthetic data in the same process; the baseline is
`DataLoader(TensorDataset(X, y), batch_size, shuffle=True)` with a standard zero_grad/backward/step
loop. Our loop is `Trainer.train_epoch` (tensors on the device, one seeded permutation per epoch,
batched indexing, chunked accumulation, divergence check). Prints examples/s and the ratio.

    python benchmarks/bench_train.py            # CPU cases of the issue (MLP b32/b128, VGG11 1k)
    python benchmarks/bench_train.py --quick    # seconds, for smoke tests
    python benchmarks/bench_train.py --gpu      # + paper VGG11 on 50,000 CIFAR-size inputs, batch 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sharpness.data import Dataset  # noqa: E402
from sharpness.models import build_model  # noqa: E402
from sharpness.train import RunConfig, RunOptions, StopRequest, Trainer  # noqa: E402


def synthetic(n: int, shape: tuple, seed: int = 0) -> Dataset:
    """Random standardized inputs with labels from a random linear teacher (learnable, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, *shape), generator=g)
    teacher = torch.randn(int(torch.tensor(shape).prod()), 10, generator=g)
    y = (X.flatten(1) @ teacher).argmax(1)
    return Dataset("synthetic", X, y, X[: n // 10], y[: n // 10])


def baseline_epoch(model, X, y, batch_size: int, lr: float, device) -> None:
    """The textbook loop: DataLoader over a TensorDataset, shuffle=True."""
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(arch: str, data: Dataset, batch_size: int, lr: float, device, run_dir: Path) -> Trainer:
    cfg = RunConfig("fashion_mnist" if data.input_shape[0] == 1 else "cifar10", arch, batch_size, lr,
                    physical_batch_size=max(batch_size, 1000))
    return Trainer(cfg, RunOptions(quiet=True), data, device, run_dir, lambda *a: None)


def ours_epoch(trainer: Trainer) -> None:
    trainer.train_epoch(StopRequest(), time.perf_counter())
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput_case(name: str, arch: str, n: int, shape: tuple, batch_size: int, device, repeats: int,
                    tmp: Path) -> dict:
    """Examples/s of ours and of the baseline, interleaved so that machine noise hits both."""
    data = synthetic(n, shape)
    trainer = make_trainer(arch, data, batch_size, 0.01, device, tmp)
    base_model = build_model(arch, shape, 10, seed=0).to(device)
    Xd, yd = data.X_train.to(device), data.y_train.to(device)
    X_host, y_host = data.X_train, data.y_train
    if device.type == "cuda":  # the usual GPU baseline: pinned host memory, copies per batch
        X_host, y_host = X_host.pin_memory(), y_host.pin_memory()
    ours, base = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: ours_epoch(trainer), 1))
        base.append(timed(lambda: baseline_epoch(base_model, X_host, y_host, batch_size, 0.01, device), 1))
    del Xd, yd
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    t_loader = timed(lambda: loader_only(X_host, y_host, batch_size), repeats)
    return {"case": name, "ours": n / t_ours, "baseline": n / t_base, "ratio": t_base / t_ours,
            "epoch_s": t_ours, "trainer": trainer, "loader_share": t_loader / t_base,
            "ceiling": t_base / max(t_base - t_loader, 1e-9)}


def loader_only(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    """Only the DataLoader's part of the baseline: iterating the batches, no training."""
    for _ in DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True):
        pass


def checkpoint_cost(trainer: Trainer, epoch_s: float, repeats: int) -> dict:
    """Seconds to write one epoch's files + checkpoint, and the share of a full epoch (train + eval)."""
    trainer.history = [trainer.evaluate_epoch()]
    eval_s = timed(trainer.evaluate_epoch, repeats)
    write_s = timed(lambda: (trainer.save_epoch_files(), trainer.save_checkpoint()), repeats)
    return {"write_s": write_s, "epoch_s": epoch_s + eval_s, "share": write_s / (epoch_s + eval_s)}


def gpu_kernel_share(trainer: Trainer) -> float:
    """Share of an epoch's wall time that the GPU spends in kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours_epoch(trainer)
    wall = time.perf_counter() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernel_us / 1e6 / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    p.add_argument("--gpu", action="store_true", help="also the paper VGG11 on 50,000 inputs on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    repeats = 1 if args.quick else args.repeats
    n_mlp, n_vgg = (2000, 64) if args.quick else (10_000, 1_000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; median of {repeats} epoch(s)")
    print(f"{'case':44s} {'ours ex/s':>10s} {'DataLoader ex/s':>16s} {'ratio':>6s} "
          f"{'loader share':>13s} {'ceiling':>8s}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("MLP b32, 10k x 1x28x28 (cpu)", "mlp_p=0", n_mlp, (1, 28, 28), 32, cpu),
                 ("MLP b128, 10k x 1x28x28 (cpu)", "mlp_p=0", n_mlp, (1, 28, 28), 128, cpu),
                 ("VGG11 b100, 1k x 3x32x32 (cpu)", "vgg11_no_dropout", n_vgg, (3, 32, 32), min(100, n_vgg), cpu)]
        if args.gpu and torch.cuda.is_available():
            cases.append(("VGG11 b100, 50k x 3x32x32 (cuda)", "vgg11_no_dropout", 2_000 if args.quick else 50_000,
                          (3, 32, 32), 100, torch.device("cuda")))
        for name, arch, n, shape, bs, device in cases:
            r = throughput_case(name, arch, n, shape, bs, device, repeats, Path(tmp) / name.split()[0])
            rows.append(r)
            print(f"{name:44s} {r['ours']:10.0f} {r['baseline']:16.0f} {r['ratio']:5.2f}x "
                  f"{100 * r['loader_share']:12.1f}% {r['ceiling']:7.2f}x", flush=True)
        mlp = rows[0]
        cost = checkpoint_cost(mlp["trainer"], mlp["epoch_s"], repeats)
        print(f"\ncheckpoint + epoch files, MLP (cpu): {cost['write_s'] * 1e3:.1f} ms per epoch = "
              f"{100 * cost['share']:.2f}% of a {cost['epoch_s']:.2f} s epoch (train + eval)")
        for r in rows:
            if r["trainer"].device.type == "cuda":
                print(f"GPU kernel time share, {r['case']}: {100 * gpu_kernel_share(r['trainer']):.1f}%")
    print("\nloader share: the part of the baseline's epoch spent iterating the DataLoader alone (no "
          "training); ceiling: the ratio a loop with no data-loading cost at all would reach "
          "(baseline / (baseline - loader)).")
    print("targets: MLP b32 ratio >= 2.0; VGG11 ratio >= 1.0; checkpoint share < 5%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
