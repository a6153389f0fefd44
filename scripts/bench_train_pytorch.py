"""Training throughput of the default fedinspect detector written in plain PyTorch, the reference
for the Rust/tch training loop (client/tests/detector_throughput.rs).

The module below is the architecture of `ArchConfig::default()` (common/src/arch.rs) written by
hand as ordinary nn.Modules, with the same parameter names; it checks them against the golden
list common/src/arch/default_params.golden. With --parity FILE (written by the Rust benchmark)
it also loads the Rust weights and compares eval-mode outputs on the stored input.

The training step is the baseline's (shared/baselines/deeppcb_centernet.py): numpy targets,
focal + 0.1 * L1 loss, AdamW with warmup and cosine, batch 8 of 320x320 crops, 2 channels.
On CUDA it trains under autocast float16 with a GradScaler, as `client bench` does.

With --infer-batches it also times inference the way `client bench` does (client/src/bench.rs):
per call, host-to-device copy, eval-mode forward (autocast float16 on CUDA), sigmoid, 3x3
max-pool peaks, top-100, box gather, and the copy of the results back to the host.

Usage: python scripts/bench_train_pytorch.py [--steps 20] [--warmup 3] [--threads 2]
                                             [--device cpu|cuda] [--batch 8]
                                             [--infer-batches 1,8] [--infer-size 640]
                                             [--parity target/detector_parity.safetensors]
"""
import argparse, math, os, random, resource, sys, time
import numpy as np
import torch, torch.nn as nn, torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "common", "src", "arch", "default_params.golden")
NC, S, IN_CH = 6, 4, 2
WIDTHS, FPN, HEAD = (16, 32, 64, 96, 128), 64, 48


class ConvBnAct(nn.Module):
    def __init__(s, ci, co, stride):
        super().__init__()
        s.conv = nn.Conv2d(ci, co, 3, stride, 1, bias=False)
        s.bn = nn.BatchNorm2d(co)

    def forward(s, x):
        return F.silu(s.bn(s.conv(x)))


class Block(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.cv1, s.cv2 = ConvBnAct(c, c, 1), ConvBnAct(c, c, 1)

    def forward(s, x):
        return x + s.cv2(s.cv1(x))


class Stage(nn.Module):
    def __init__(s, ci, co):
        super().__init__()
        s.down = ConvBnAct(ci, co, 2)
        s.b0 = Block(co)

    def forward(s, x):
        return s.b0(s.down(x))


class Attention(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.d = max(c // 4, 8)
        s.q, s.k, s.v = nn.Conv2d(c, s.d, 1), nn.Conv2d(c, s.d, 1), nn.Conv2d(c, c, 1)
        s.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(s.proj.weight); nn.init.zeros_(s.proj.bias)

    def forward(s, x):
        q = s.q(x).flatten(2).transpose(1, 2)                       # [N, P, d]
        k = s.k(x).flatten(2)                                       # [N, d, P]
        a = torch.softmax((q @ k) * (1.0 / math.sqrt(s.d)), dim=-1)  # [N, P, P]
        m = (s.v(x).flatten(2) @ a.transpose(1, 2)).reshape(x.shape)
        return x + s.proj(m)


class Backbone(nn.Module):
    def __init__(s):
        super().__init__()
        w = WIDTHS
        s.stem = ConvBnAct(IN_CH, w[0], 2)
        s.s1, s.s2, s.s3, s.s4 = Stage(w[0], w[1]), Stage(w[1], w[2]), Stage(w[2], w[3]), Stage(w[3], w[4])
        s.attn = Attention(w[4])

    def forward(s, x):
        x1 = s.s1(s.stem(x)); x2 = s.s2(x1); x3 = s.s3(x2)
        return x1, x2, x3, s.attn(s.s4(x3))


class Neck(nn.Module):
    def __init__(s):
        super().__init__()
        s.lateral1, s.lateral2, s.lateral3, s.lateral4 = (nn.Conv2d(c, FPN, 1) for c in WIDTHS[1:])

    def forward(s, x1, x2, x3, x4):
        p = s.lateral4(x4)
        p = s.lateral3(x3) + F.interpolate(p, scale_factor=2, mode="nearest")
        p = s.lateral2(x2) + F.interpolate(p, scale_factor=2, mode="nearest")
        return s.lateral1(x1) + F.interpolate(p, scale_factor=2, mode="nearest")


class Head(nn.Module):
    def __init__(s):
        super().__init__()
        s.heatmap_hidden, s.heatmap = nn.Conv2d(FPN, HEAD, 3, 1, 1), nn.Conv2d(HEAD, NC, 1)
        s.box_hidden, s.box = nn.Conv2d(FPN, HEAD, 3, 1, 1), nn.Conv2d(HEAD, 4, 1)
        nn.init.constant_(s.heatmap.bias, -2.19)

    def forward(s, p):
        return s.heatmap(F.silu(s.heatmap_hidden(p))), s.box(F.silu(s.box_hidden(p)))


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.backbone, s.neck, s.head = Backbone(), Neck(), Head()

    def forward(s, x):
        return s.head(s.neck(*s.backbone(x)))


def check_against_golden(net):
    want = {}
    for line in open(GOLDEN):
        name, rest = line.split(" ", 1)
        shape, kind = rest.rsplit(" ", 1)
        want[name] = (tuple(int(d) for d in shape.strip("[]").split(", ") if d), kind.strip())
    got = {k: (tuple(v.shape), "param") for k, v in net.named_parameters()}
    got.update({k: (tuple(v.shape), "buffer") for k, v in net.named_buffers() if not k.endswith("num_batches_tracked")})
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        sys.exit(f"PyTorch module does not match {GOLDEN}: {diff[:10]}")
    return sum(p.numel() for p in net.parameters())


def parity(net, path):
    from safetensors.torch import load_file
    t = load_file(path)
    x, hm, box = t.pop("parity.input"), t.pop("parity.heatmap"), t.pop("parity.box")
    missing, unexpected = net.load_state_dict(t, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    net.eval()
    with torch.no_grad():
        h, b = net(x)
    net.train()
    dh, db = (h - hm).abs().max().item(), (b - box).abs().max().item()
    print(f"parity with the Rust module: max |diff| heatmap {dh:.2e}, box {db:.2e} "
          f"(outputs up to {hm.abs().max().item():.1f})")
    if max(dh, db) > 1e-3:
        sys.exit("parity check failed: the PyTorch module computes something else")


def targets(boxes, H, W):  # the baseline's, boxes [n, 5] with 0-based classes
    h, w = H // S, W // S
    hm = np.zeros((NC, h, w), np.float32); reg = np.zeros((4, h, w), np.float32); mask = np.zeros((h, w), np.float32)
    for x1, y1, x2, y2, c in boxes:
        cx, cy = (x1 + x2) / 2 / S, (y1 + y2) / 2 / S
        bw, bh = (x2 - x1) / S, (y2 - y1) / S
        ix, iy = int(cx), int(cy)
        if not (0 <= ix < w and 0 <= iy < h): continue
        sig = max(0.5, min(bw, bh) / 6)
        ys, xs = np.ogrid[:h, :w]
        g = np.exp(-((xs - cx + 0.5) ** 2 + (ys - cy + 0.5) ** 2) / (2 * sig * sig))
        k = int(c)
        hm[k] = np.maximum(hm[k], g); hm[k, iy, ix] = 1.0
        reg[:, iy, ix] = [bw, bh, cx - ix, cy - iy]; mask[iy, ix] = 1
    return hm, reg, mask


def focal(pred, gt):
    p = pred.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float(); neg = 1 - pos
    pl = torch.log(p) * (1 - p) ** 2 * pos
    nl = torch.log(1 - p) * p ** 2 * (1 - gt) ** 4 * neg
    return -(pl.sum() + nl.sum()) / pos.sum().clamp(min=1)


def synthetic_batch(rng, B=8, size=320, objects=6):
    img = np.full((B, IN_CH, size, size), 0.2, np.float32); boxes = []
    for i in range(B):
        bs = []
        for k in range(objects):
            w, h = rng.randrange(8, size // 4), rng.randrange(8, size // 4)
            x0, y0 = rng.randrange(0, size - w), rng.randrange(0, size - h)
            img[i, 0, y0:y0 + h, x0:x0 + w] = 1.0
            bs.append((x0, y0, x0 + w, y0 + h, k % NC))
        boxes.append(np.array(bs, np.float32))
    return img, boxes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def infer_latency(net, device, batch, size, iters, warmup):
    """Median and p99 wall time of one inference call (ms), as client/src/bench.rs measures it."""
    net.eval()
    x = torch.full((batch, IN_CH, size, size), 0.2)
    cuda = device.type == "cuda"

    def call():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            hm, reg = net(x.to(device))
            hm, reg = hm.float().sigmoid(), reg.float()
            hm = hm * (F.max_pool2d(hm, 3, 1, 1) == hm).float()
            n, c, h, w = hm.shape
            scores, index = hm.view(n, -1).topk(100)
            cell = (index % (h * w)).unsqueeze(1).expand(n, 4, 100)
            boxes = reg.view(n, 4, h * w).gather(2, cell)
            return scores.cpu(), index.cpu(), boxes.cpu()

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t = time.perf_counter(); call(); times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    rank = lambda q: times[min(len(times), max(1, math.ceil(q * len(times)))) - 1]
    net.train()
    return rank(0.5), rank(0.99)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--infer-batches", default="", help="e.g. 1,8: also time inference")
    ap.add_argument("--infer-size", type=int, default=640)
    ap.add_argument("--infer-iters", type=int, default=50)
    ap.add_argument("--parity")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(a.threads); torch.manual_seed(0); rng = random.Random(0)
    net = Net()
    n = check_against_golden(net)
    print(f"PyTorch module: {n} parameters, names and shapes match the golden list")
    if a.parity:
        parity(net, a.parity)
    net.to(device)
    B = a.batch
    batches = [synthetic_batch(rng, B) for _ in range(4)]
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    total = a.warmup + a.steps
    marks, cpu_marks = [], []
    for step in range(total):
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / total)) * min(1, (step + 1) / 100)
        for g in opt.param_groups: g["lr"] = lr
        img, boxes = batches[step % len(batches)]
        x = torch.from_numpy(img).to(device)
        tg = [targets(b, 320, 320) for b in boxes]
        hm_t = torch.from_numpy(np.stack([t[0] for t in tg])).to(device)
        reg_t = torch.from_numpy(np.stack([t[1] for t in tg])).to(device)
        m = torch.from_numpy(np.stack([t[2] for t in tg])).unsqueeze(1).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            hm, reg = net(x)
        hm, reg = hm.float(), reg.float()
        loss = focal(hm, hm_t) + 0.1 * (F.l1_loss(reg * m, reg_t * m, reduction="sum") / m.sum().clamp(min=1))
        opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        loss.item()
        marks.append(time.perf_counter())
        cpu_marks.append((time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
    dt = marks[-1] - marks[a.warmup - 1]
    cpu = cpu_marks[-1][0] - cpu_marks[a.warmup - 1][0]
    faults = (cpu_marks[-1][1] - cpu_marks[a.warmup - 1][1]) // a.steps
    median = sorted(b - a_ for a_, b in zip(marks[a.warmup - 1:], marks[a.warmup:]))[a.steps // 2]
    where = torch.cuda.get_device_name(device) if cuda else f"{a.threads} threads"
    print(f"PyTorch {torch.__version__}, {where}: {a.steps} steps of {B} at 320x320 in {dt:.2f} s, "
          f"{a.steps * B / dt:.1f} images/s (median step {B / median:.1f} images/s; "
          f"{cpu / dt:.2f} cores busy; {faults} page faults/step; last loss {loss.item():.3f}"
          f"{'; autocast float16' if cuda else ''})")
    for b in [int(v) for v in a.infer_batches.split(",") if v]:
        med, p99 = infer_latency(net, device, b, a.infer_size, a.infer_iters, 5)
        print(f"PyTorch inference: batch {b} at {a.infer_size}x{a.infer_size}: median {med:.2f} ms, "
              f"p99 {p99:.2f} ms per call ({med / b:.2f} ms per image, {b * 1e3 / med:.1f} images/s)")


if __name__ == "__main__":
    main()
