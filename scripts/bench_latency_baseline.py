"""CPU inference latency of the team's PyTorch baseline (shared/baselines/deeppcb_centernet.py),
measured the way `client bench` measures ours: one 640x640 two-channel image per call, eval mode,
no_grad, forward plus the baseline's own decoding, median and p99 over many calls. Its model and
decoder are taken from the baseline file itself (the lines before its training code), so this
measures exactly that network, untrained (latency does not depend on the weights).

Usage: python scripts/bench_latency_baseline.py [--baseline PATH] [--threads 2] [--iters 50]
"""
import argparse, math, os, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "..", "shared", "baselines", "deeppcb_centernet.py")


def load_baseline(path):
    src = open(path).read()
    cut = src.find("\nt0 = time.time()")
    if cut < 0:
        sys.exit(f"{path}: cannot find where its training code starts ('t0 = time.time()')")
    try:
        import PIL  # noqa: F401  (the baseline imports it to read images; latency does not)
    except ImportError:
        import types
        sys.modules["PIL"] = types.SimpleNamespace(Image=None)
    saved = sys.argv
    sys.argv = [path, "unused-data-dir", "0", "unused.json"]
    scope = {"__name__": "baseline", "__file__": path}
    exec(compile(src[:cut], path, "exec"), scope)
    sys.argv = saved
    return scope


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--size", type=int, default=640)
    a = ap.parse_args()
    b = load_baseline(a.baseline)
    torch = b["torch"]
    torch.set_num_threads(a.threads)
    net = b["Net"]().eval()
    params = sum(p.numel() for p in net.parameters())
    x = torch.full((1, 2, a.size, a.size), 0.2)
    with torch.no_grad():
        for _ in range(5):
            hm, reg = net(x); b["decode"](hm, reg)
        times = []
        for _ in range(a.iters):
            t = time.perf_counter()
            hm, reg = net(x); b["decode"](hm, reg)
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    rank = lambda q: times[min(len(times), max(1, math.ceil(q * len(times)))) - 1]
    print(f"baseline (PyTorch {torch.__version__}, {params} params, {a.threads} threads): batch 1 at "
          f"{a.size}x{a.size}: median {rank(0.5):.2f} ms, p99 {rank(0.99):.2f} ms per image over {a.iters} calls")


if __name__ == "__main__":
    main()
